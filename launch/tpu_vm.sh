#!/usr/bin/env bash
# Usage: launch/tpu_vm.sh COMMAND [options] [--config.a.b=value ...] [-- extra train args]
#
# Train NextStep-1 on a Cloud TPU VM pod (a queued resource by default; multislice needs one).
#
# Commands:
#   up         create the TPU, wait until it is ready, install the package, start training
#   supervise  like up, then keep it alive: recreate + reinstall + relaunch after a preemption
#              (training resumes from the newest checkpoint in --workdir); exits when training ends
#   create | install | train    the single steps of up
#   encode     latent caching as a multi-host JAX job: `nextstep-jax data encode --distributed ARGS` (ARGS
#              after --, e.g. -- --src gs://B/raw --dst gs://B/latents --vae gs://B/model) on every worker,
#              one process per host, each encoding its part; host 0 merges (log: ~/nextstep/logs/encode.log)
#   status     the TPU's state and whether training runs on worker 0
#   logs       tail each worker's log (~/nextstep/logs/train.log)
#   delete     delete the TPU (and the queued resource)
#
# Options:
#   --stage STAGE | --config PATH   stage1_256px stage2_512px anneal_512px sft edit dpo, or a
#                                   path under configs/ (configs/ is synced to the workers)
#   --workdir gs://BUCKET/RUN       checkpoints + TensorBoard logs (shared by every host)
#   --zone ZONE                     e.g. us-east5-a (required)
#   --accelerator-type TYPE         e.g. v5p-256 (one slice)
#   --num-slices N                  slices joined over DCN (default 1); sets --config.mesh.dcn_data=N
#   --name NAME                     TPU / queued resource name (default nextstep-<stage>)
#   --project PROJECT               default: gcloud's configured project
#   --mode qr|vm                    queued resource (default) or `tpu-vm create` (one slice only)
#   --spot | --preemptible | --reserved   capacity type (default on-demand; --preemptible: vm only)
#   --runtime-version VERSION       TPU software version (default per generation)
#   --package-source SRC            git+https://HOST/REPO@REF, or gs://BUCKET/PATH/nextstep_jax-*.whl
#                                   (or .tar.gz) (required by up, supervise, install)
#   --staging-dir gs://PATH         configs and uploaded worker logs (default WORKDIR/launch)
#   --python VERSION                worker Python, installed with uv (default 3.12)
#   --create-arg ARG                extra flag for the create command (repeatable), e.g.
#                                   --create-arg=--network=my-net
#   --poll SECONDS                  supervise/up polling period (default 60)
#   --max-restarts N                supervise: recreations after preemption (default 100)
#   --max-failures N                supervise: relaunches after a non-zero exit (default 3)
#   --worker W | --lines N | --follow   logs: which worker (default all), how many lines, follow
#   --dry-run                       print every command, one per line, and run none
#
# Tests (launch/README.md): NEXTSTEP_LAUNCH_STATE_CMD / NEXTSTEP_LAUNCH_JOB_CMD name executables
# that answer the TPU-state / job-state queries instead of gcloud.

set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

MODE=qr PROVISIONING="" RUNTIME="" PACKAGE_SOURCE="" STAGING="" PYTHON=3.12 POLL=60
MAX_RESTARTS=100 MAX_FAILURES=3 WORKER=all TAIL_LINES=50 FOLLOW=0
CREATE_ARGS=()
# The tilde is for each worker's shell to expand.
# shellcheck disable=SC2088
REMOTE_DIR="~/nextstep"

parse_option() {
  case $1 in
    --mode) optval MODE "$@" ;;
    --spot | --preemptible | --reserved)
      [[ -z $PROVISIONING ]] || die "choose one of --spot, --preemptible, --reserved"
      PROVISIONING=${1#--} ;;
    --runtime-version) optval RUNTIME "$@" ;;
    --package-source) optval PACKAGE_SOURCE "$@" ;;
    --staging-dir) optval STAGING "$@" ;;
    --python) optval PYTHON "$@" ;;
    --create-arg) optval "CREATE_ARGS[${#CREATE_ARGS[@]}]" "$@" ;;
    --poll) optval POLL "$@" ;;
    --max-restarts) optval MAX_RESTARTS "$@" ;;
    --max-failures) optval MAX_FAILURES "$@" ;;
    --worker) optval WORKER "$@" ;;
    --lines) optval TAIL_LINES "$@" ;;
    --follow) FOLLOW=1 ;;
    *) return 1 ;;
  esac
}

validate_resource() {  # what every command needs to address the TPU
  default_name
  [[ -n $ZONE ]] || die "--zone is required (e.g. us-east5-a)"
  [[ $MODE == qr || $MODE == vm ]] || die "--mode must be qr or vm (got '$MODE')"
  LOCATION=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOCATION+=(--project="$PROJECT"); fi
}

validate_create() {
  validate_accelerator
  validate_slices
  if [[ $MODE == vm && $NUM_SLICES -gt 1 ]]; then
    die "multislice (--num-slices > 1) needs --mode qr (queued resources)"
  fi
  if [[ $MODE == qr && $PROVISIONING == preemptible ]]; then
    die "--preemptible is for --mode vm; queued resources use --spot"
  fi
  if [[ -z $RUNTIME ]]; then
    case ${ACCEL%-*} in
      v5p) RUNTIME=v2-alpha-tpuv5 ;;
      v5litepod) RUNTIME=v2-alpha-tpuv5-lite ;;
      v6e) RUNTIME=v2-alpha-tpuv6e ;;
      *) RUNTIME=tpu-ubuntu2204-base ;;
    esac
  fi
}

validate_package() {
  case $PACKAGE_SOURCE in
    git+?* | gs://?*.whl | gs://?*.tar.gz) ;;
    "") die "--package-source is required (git+https://HOST/REPO@REF or gs://BUCKET/PATH/nextstep_jax-*.whl)" ;;
    *) die "--package-source '$PACKAGE_SOURCE' is not git+URL[@REF] nor a gs:// .whl / .tar.gz" ;;
  esac
  [[ $PACKAGE_SOURCE != *[\"\$\`\\\ ]* ]] || die "--package-source must not contain spaces, quotes, \$, \` or \\"
  [[ $PYTHON =~ ^3\.[0-9]+$ ]] || die "--python takes a version like 3.12 (got '$PYTHON')"
}

validate_staging() {  # where configs go up and worker logs come back
  if [[ -z $STAGING ]]; then
    [[ $WORKDIR == gs://?* ]] || die "--staging-dir gs://... is required when --workdir is not on gs://"
    STAGING=${WORKDIR%/}/launch
  fi
  [[ $STAGING == gs://?* ]] || die "--staging-dir must be a gs:// path (got '$STAGING')"
  [[ $CONFIG == configs/*.py ]] || die "--config must be a .py path under configs/ (it is synced to the workers)"
}

# ---- gcloud commands (each builder sets CMD) -------------------------------------------------

create_cmd() {
  if [[ $MODE == qr ]]; then
    CMD=(gcloud compute tpus queued-resources create "$NAME" "${LOCATION[@]}"
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
    if ((NUM_SLICES > 1)); then
      CMD+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
    else
      CMD+=(--node-id="$NAME")
    fi
  else
    CMD=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
      --accelerator-type="$ACCEL" --version="$RUNTIME")
  fi
  if [[ -n $PROVISIONING ]]; then CMD+=("--$PROVISIONING"); fi
  CMD+=("${CREATE_ARGS[@]}")
}

describe_cmd() {  # describe_cmd [FORMAT]
  if [[ $MODE == qr ]]; then
    CMD=(gcloud compute tpus queued-resources describe "$NAME" "${LOCATION[@]}")
  else
    CMD=(gcloud compute tpus tpu-vm describe "$NAME" "${LOCATION[@]}")
  fi
  if (($#)); then CMD+=(--format="$1"); fi
}

delete_cmd() {
  if [[ $MODE == qr ]]; then
    CMD=(gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet)
  else
    CMD=(gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet)
  fi
}

ssh_cmd() {  # ssh_cmd WORKER REMOTE_COMMAND (WORKER: all, or an index in the first slice)
  if [[ $MODE == qr ]]; then
    local node=0
    if [[ $1 == all ]]; then node=all; fi
    CMD=(gcloud compute tpus queued-resources ssh "$NAME" "${LOCATION[@]}" --node="$node" --worker="$1")
  else
    CMD=(gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" --worker="$1")
  fi
  CMD+=(--command="$2")
}

# ---- what runs on the workers ----------------------------------------------------------------

install_remote() {  # uv gives every worker the same Python (TPU images ship 3.10; we need >= 3.11)
  # shellcheck disable=SC2088
  local uv="~/.local/bin/uv" fetch="" spec="nextstep_jax[tpu] @ $PACKAGE_SOURCE"
  if [[ $PACKAGE_SOURCE == gs://* ]]; then
    fetch="gcloud storage cp $PACKAGE_SOURCE /tmp/ && "
    spec="nextstep_jax[tpu] @ file:///tmp/${PACKAGE_SOURCE##*/}"
  fi
  printf '%s' "mkdir -p $REMOTE_DIR && cd $REMOTE_DIR" \
    " && { [ -x $uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; }" \
    " && ${fetch}$uv venv --allow-existing --python $PYTHON venv" \
    " && $uv pip install --python venv/bin/python $(dq "$spec")" \
    " && gcloud storage rsync --recursive $(shq "$STAGING/configs") configs"
}

train_remote() {  # start training detached; its exit code lands in train.rc, its log in GCS too
  train_args
  local inner
  inner="$(quote_cmd venv/bin/nextstep-jax "${TRAIN_ARGS[@]}"); rc=\$?"
  inner+="; gcloud storage cp logs/train.log $(shq "$STAGING/logs")/\$(hostname)-\$(date +%Y%m%d-%H%M%S).log"
  inner+="; echo \$rc > train.rc"
  printf '%s' "cd $REMOTE_DIR && mkdir -p logs" \
    " && if [ -f train.pid ] && kill -0 \"\$(cat train.pid)\" 2>/dev/null;" \
    " then echo \"training already runs on \$(hostname)\";" \
    " else rm -f train.rc; nohup bash -c $(dq "$inner") >> logs/train.log 2>&1 < /dev/null & echo \$! > train.pid; fi"
}

encode_remote() {  # start the encode detached on this worker; exit code in encode.rc
  local inner
  inner="$(quote_cmd venv/bin/nextstep-jax data encode --distributed "${EXTRA_TRAIN[@]}"); echo \$? > encode.rc"
  printf '%s' "cd $REMOTE_DIR && mkdir -p logs && rm -f encode.rc" \
    " && nohup bash -c $(dq "$inner") >> logs/encode.log 2>&1 < /dev/null &"
}

JOB_PROBE="cd $REMOTE_DIR 2>/dev/null && if [ -f train.rc ]; then echo \"EXITED \$(cat train.rc)\";"
JOB_PROBE+=" elif [ -f train.pid ] && kill -0 \"\$(cat train.pid)\" 2>/dev/null; then echo RUNNING;"
JOB_PROBE+=" else echo NONE; fi || echo NONE"

# ---- steps -----------------------------------------------------------------------------------

create_resource() { create_cmd; run "${CMD[@]}"; }
delete_resource() { delete_cmd; run "${CMD[@]}"; }

install_package() {
  run gcloud storage rsync --recursive "$REPO_ROOT/configs" "$STAGING/configs" &&
    ssh_cmd all "$(install_remote)" && run "${CMD[@]}"
}

launch_training() { ssh_cmd all "$(train_remote)" && run "${CMD[@]}"; }
launch_encode() {
  [[ ${#EXTRA_TRAIN[@]} -gt 0 ]] ||
    die "encode needs the data encode arguments after --, e.g. -- --src gs://B/raw --dst gs://B/lat --vae gs://B/m"
  ssh_cmd all "$(encode_remote)" && run "${CMD[@]}"
}

resource_state() {  # resource_state VAR: READY/ACTIVE, PREEMPTED, SUSPENDED, ..., or NOT_FOUND
  local ready=ACTIVE field=state.state
  if [[ $MODE == vm ]]; then ready=READY field=state; fi
  describe_cmd "value($field)"
  query "$1" "${NEXTSTEP_LAUNCH_STATE_CMD:-}" "$ready" "${CMD[@]}"
  if [[ -z ${!1} ]]; then printf -v "$1" NOT_FOUND; fi
}

job_status() {  # job_status VAR: RUNNING, "EXITED <rc>", NONE (never started here), or "" (no answer)
  ssh_cmd 0 "$JOB_PROBE"
  query "$1" "${NEXTSTEP_LAUNCH_JOB_CMD:-}" "EXITED 0" "${CMD[@]}"
}

wait_ready() {
  local state
  while :; do
    resource_state state
    case $state in
      READY | ACTIVE) return 0 ;;
      PREEMPTED | SUSPENDED | SUSPENDING | TERMINATED | STOPPED | FAILED | NOT_FOUND)
        die "$NAME is $state" ;;
    esac
    info "$NAME is $state; waiting"
    pause "$POLL"
  done
}

up() {
  create_resource
  wait_ready
  install_package
  launch_training
  if ((!DRY_RUN)); then
    info "training started; follow it: $PROG logs --follow --worker 0 (same --name/--zone/--mode/--project)"
  fi
}

# The preemption loop. A trainer that gets SIGTERM saves and exits 0, so "EXITED 0" only counts
# as finished when the next poll still sees a healthy TPU and the same answer.
supervise() {
  local state job restarts=0 failures=0 need_launch=1 finished=0
  while :; do
    resource_state state
    case $state in
      READY | ACTIVE)
        job=NONE
        if ((!need_launch)); then job_status job; fi
        case $job in
          RUNNING) finished=0 ;;
          "EXITED 0")
            if ((finished)); then info "training finished (exit 0)"; return 0; fi
            finished=1 ;;
          "EXITED "*)
            failures=$((failures + 1))
            ((failures <= MAX_FAILURES)) || die "training failed $failures times (last: $job); see: $PROG logs"
            warn "training $job; relaunch $failures/$MAX_FAILURES"
            launch_training || warn "relaunch failed; retrying at the next poll" ;;
          NONE)
            if install_package && launch_training; then need_launch=0; else warn "launch failed; retrying"; fi ;;
          *) warn "no job state from worker 0 (${job:-no answer}); asking again" ;;
        esac ;;
      PREEMPTED | SUSPENDED | SUSPENDING | TERMINATED | FAILED)
        restarts=$((restarts + 1))
        ((restarts <= MAX_RESTARTS)) || die "$NAME is $state and --max-restarts $MAX_RESTARTS is used up"
        warn "$NAME is $state: recreating it (restart $restarts/$MAX_RESTARTS)"
        delete_resource || warn "delete failed"
        create_resource || warn "create failed; retrying at the next poll"
        need_launch=1 finished=0 ;;
      NOT_FOUND)
        create_resource || warn "create failed; retrying at the next poll"
        need_launch=1 ;;
      STOPPED) die "$NAME was stopped by hand; not restarting it" ;;
      *) info "$NAME is $state; waiting" ;;
    esac
    pause "$POLL"
  done
}

status() {
  describe_cmd
  run "${CMD[@]}"
  ssh_cmd 0 "$JOB_PROBE"
  run "${CMD[@]}"
}

logs() {
  local follow=""
  if ((FOLLOW)); then follow=" -F"; fi
  ssh_cmd "$WORKER" "tail -n $TAIL_LINES$follow $REMOTE_DIR/logs/train.log | sed -u \"s/^/[\$(hostname)] /\""
  run "${CMD[@]}"
}

main() {
  local command=${1:-}
  case $command in
    -h | --help) usage; exit 0 ;;
    up | supervise | create | install | train | encode | status | logs | delete) shift ;;
    "" | -*) die "a command is required: up supervise create install train encode status logs delete" ;;
    *) die "unknown command '$command' (up supervise create install train encode status logs delete)" ;;
  esac
  parse_args "$@"
  [[ $POLL =~ ^[0-9]+$ && $MAX_RESTARTS =~ ^[0-9]+$ && $MAX_FAILURES =~ ^[0-9]+$ && $TAIL_LINES =~ ^[0-9]+$ ]] ||
    die "--poll, --max-restarts, --max-failures and --lines take whole numbers"
  case $command in
    up | supervise | install | train) validate_train ;;
  esac
  validate_resource
  case $command in
    up | supervise | create) validate_create ;;
  esac
  case $command in
    up | supervise | install) validate_package ;;
  esac
  case $command in
    up | supervise | install | train) validate_staging ;;
  esac
  case $command in
    up) up ;;
    supervise) supervise ;;
    create) create_resource ;;
    install) install_package ;;
    train) launch_training ;;
    encode) launch_encode ;;
    status) status ;;
    logs) logs ;;
    delete) delete_resource ;;
  esac
}

main "$@"
