#!/usr/bin/env bash
# Usage: launch/gke.sh COMMAND [options] [--config.a.b=value ...] [-- extra train args]
#
# Train NextStep-1 on TPU slices of a GKE cluster, through XPK (default) or a plain JobSet.
# Preemption: the JobSet restarts every slice (up to --max-restarts) and training resumes from the
# newest checkpoint in --workdir.
#
# Commands:
#   submit   xpk: `xpk workload create`; jobset: get cluster credentials, `kubectl apply` the manifest
#   render   print the JobSet manifest (jobset backend; runs nothing)
#   status   xpk workload list / kubectl get jobset,pods
#   logs     kubectl logs of every pod of the workload
#   delete   xpk workload delete / kubectl delete jobset
#
# Options:
#   --backend xpk|jobset            default xpk
#   --cluster CLUSTER               the GKE cluster (required except for render)
#   --stage STAGE | --config PATH   stage1_256px stage2_512px anneal_512px sft edit dpo, or a
#                                   config path inside the image's working directory
#   --workdir gs://BUCKET/RUN       checkpoints + TensorBoard logs (shared by every host)
#   --tpu-type TYPE                 one slice, e.g. v5p-256 (alias: --accelerator-type)
#   --num-slices N                  slices joined over DCN (default 1); sets --config.mesh.dcn_data=N
#   --docker-image IMAGE            has nextstep_jax[tpu] installed and configs/ in its workdir
#   --name NAME                     workload / JobSet name (default nextstep-<stage>)
#   --project PROJECT | --zone ZONE       passed to xpk and gcloud (default: gcloud's config)
#   --location LOCATION             the cluster's zone or region for credentials (default --zone)
#   --max-restarts N                whole-workload restarts, e.g. after preemption (default 50)
#   --priority P                    xpk: very-low low medium high very-high
#   --topology AxB[xC]              jobset: the node pools' TPU topology, e.g. 4x4x8 for v5p-256
#   --namespace NS | --queue Q      jobset: namespace (default default), Kueue LocalQueue (optional)
#   --grace-seconds S               jobset: time to save a checkpoint after SIGTERM (default 300)
#   --lines N | --follow            logs: how many lines per pod (default 50), follow
#   --dry-run                       print every command, one per line, and run none

set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BACKEND=xpk CLUSTER="" IMAGE="" LOCATION="" MAX_RESTARTS=50 PRIORITY="" TOPOLOGY=""
NAMESPACE=default QUEUE="" GRACE_SECONDS=300 TAIL_LINES=50 FOLLOW=0

parse_option() {
  case $1 in
    --backend) optval BACKEND "$@" ;;
    --cluster) optval CLUSTER "$@" ;;
    --docker-image) optval IMAGE "$@" ;;
    --location) optval LOCATION "$@" ;;
    --max-restarts) optval MAX_RESTARTS "$@" ;;
    --priority) optval PRIORITY "$@" ;;
    --topology) optval TOPOLOGY "$@" ;;
    --namespace) optval NAMESPACE "$@" ;;
    --queue) optval QUEUE "$@" ;;
    --grace-seconds) optval GRACE_SECONDS "$@" ;;
    --lines) optval TAIL_LINES "$@" ;;
    --follow) FOLLOW=1 ;;
    *) return 1 ;;
  esac
}

# GKE_ACCELERATOR, CHIPS_PER_HOST, HOSTS (per slice) for ACCEL; checks TOPOLOGY against it.
slice_shape() {
  local size=${ACCEL##*-} cores_per_chip=1 single_host_max=8 chips product=1 dim
  case ${ACCEL%-*} in
    v4) GKE_ACCELERATOR=tpu-v4-podslice cores_per_chip=2 single_host_max=4 ;;
    v5p) GKE_ACCELERATOR=tpu-v5p-slice cores_per_chip=2 single_host_max=4 ;;
    v5litepod) GKE_ACCELERATOR=tpu-v5-lite-podslice ;;
    v6e) GKE_ACCELERATOR=tpu-v6e-slice ;;
    *) die "$ACCEL is not offered on GKE (use v4, v5p, v5litepod or v6e)" ;;
  esac
  chips=$((size / cores_per_chip))
  ((chips >= 1 && size % cores_per_chip == 0)) || die "unknown accelerator type '$ACCEL' (odd core count)"
  [[ -n $TOPOLOGY ]] || die "--topology is required for the jobset backend (the node pools' topology, e.g. 4x4x8)"
  [[ $TOPOLOGY =~ ^[1-9][0-9]*(x[1-9][0-9]*){1,2}$ ]] || die "--topology '$TOPOLOGY' is not AxB or AxBxC"
  for dim in ${TOPOLOGY//x/ }; do product=$((product * dim)); done
  ((product == chips)) || die "--topology $TOPOLOGY has $product chips but $ACCEL has $chips"
  CHIPS_PER_HOST=4
  if ((chips <= single_host_max)); then CHIPS_PER_HOST=$chips; fi
  HOSTS=$((chips / CHIPS_PER_HOST))
}

yaml_list() {  # a flow sequence of double-quoted YAML strings
  local out="" word
  for word in "$@"; do
    word=${word//\\/\\\\}
    out+="${out:+, }\"${word//\"/\\\"}\""
  done
  printf '[%s]' "$out"
}

# render_template FILE KEY...: replace {{KEY}} with $TPL_KEY; drop lines whose field is empty.
render_template() {
  local file=$1
  shift
  awk -v keys="$*" '
    BEGIN { n = split(keys, key, " ") }
    {
      line = $0; drop = 0
      for (i = 1; i <= n; i++) {
        field = "{{" key[i] "}}"; value = ENVIRON["TPL_" key[i]]; out = ""
        while ((p = index(line, field)) > 0) {
          if (value == "") drop = 1
          out = out substr(line, 1, p - 1) value; line = substr(line, p + length(field))
        }
        line = out line
      }
      if (line ~ /\{\{[A-Z_]+\}\}/) { print "unknown template field in: " line > "/dev/stderr"; exit 1 }
      if (!drop) print line
    }' "$file"
}

manifest() {
  slice_shape
  train_args
  TPL_NAME=$NAME TPL_NAMESPACE=$NAMESPACE TPL_QUEUE=$QUEUE TPL_MAX_RESTARTS=$MAX_RESTARTS \
    TPL_NUM_SLICES=$NUM_SLICES TPL_HOSTS=$HOSTS TPL_GRACE_SECONDS=$GRACE_SECONDS \
    TPL_GKE_ACCELERATOR=$GKE_ACCELERATOR TPL_TOPOLOGY=$TOPOLOGY TPL_IMAGE=$IMAGE \
    TPL_COMMAND=$(yaml_list nextstep-jax "${TRAIN_ARGS[@]}") TPL_CHIPS_PER_HOST=$CHIPS_PER_HOST \
    render_template "$LAUNCH_DIR/jobset.yaml.tmpl" NAME NAMESPACE QUEUE MAX_RESTARTS NUM_SLICES HOSTS \
    GRACE_SECONDS GKE_ACCELERATOR TOPOLOGY IMAGE COMMAND CHIPS_PER_HOST
}

xpk_create() {
  train_args
  local cmd=(xpk workload create --cluster="$CLUSTER" --workload="$NAME" --tpu-type="$ACCEL"
    --num-slices="$NUM_SLICES" --docker-image="$IMAGE" --max-restarts="$MAX_RESTARTS")
  if [[ -n $PRIORITY ]]; then cmd+=(--priority="$PRIORITY"); fi
  run "${cmd[@]}" "${XPK_LOCATION[@]}" --command="$(quote_cmd nextstep-jax "${TRAIN_ARGS[@]}")"
}

credentials() {
  run gcloud container clusters get-credentials "$CLUSTER" --location="$LOCATION" "${PROJECT_FLAG[@]}"
}

submit() {
  if [[ $BACKEND == xpk ]]; then
    xpk_create
  else
    local text
    text=$(manifest)
    credentials
    run_stdin "$text" kubectl apply -f -
  fi
}

status() {
  if [[ $BACKEND == xpk ]]; then
    run xpk workload list --cluster="$CLUSTER" --filter-by-job="$NAME" "${XPK_LOCATION[@]}"
  else
    credentials
    run kubectl get jobset "$NAME" --namespace="$NAMESPACE"
    run kubectl get pods --namespace="$NAMESPACE" --selector="jobset.sigs.k8s.io/jobset-name=$NAME"
  fi
}

logs() {
  local cmd=(kubectl logs --namespace="$NAMESPACE" --selector="jobset.sigs.k8s.io/jobset-name=$NAME"
    --prefix --tail="$TAIL_LINES" --max-log-requests=1000)
  if ((FOLLOW)); then cmd+=(--follow); fi
  credentials
  run "${cmd[@]}"
}

delete() {
  if [[ $BACKEND == xpk ]]; then
    run xpk workload delete --cluster="$CLUSTER" --workload="$NAME" "${XPK_LOCATION[@]}"
  else
    credentials
    run kubectl delete jobset "$NAME" --namespace="$NAMESPACE"
  fi
}

main() {
  local command=${1:-}
  case $command in
    -h | --help) usage; exit 0 ;;
    submit | render | status | logs | delete) shift ;;
    "" | -*) die "a command is required: submit render status logs delete" ;;
    *) die "unknown command '$command' (submit render status logs delete)" ;;
  esac
  parse_args "$@"
  [[ $BACKEND == xpk || $BACKEND == jobset ]] || die "--backend must be xpk or jobset (got '$BACKEND')"
  [[ $MAX_RESTARTS =~ ^[0-9]+$ && $GRACE_SECONDS =~ ^[0-9]+$ && $TAIL_LINES =~ ^[0-9]+$ ]] ||
    die "--max-restarts, --grace-seconds and --lines take whole numbers"
  case $command in
    submit | render)
      validate_train
      validate_accelerator
      [[ -n $IMAGE ]] || die "--docker-image is required (an image with nextstep_jax[tpu] and configs/)" ;;
    status | logs | delete) default_name ;;
  esac
  if [[ $command == render ]]; then manifest; return; fi
  [[ -n $CLUSTER ]] || die "--cluster is required"
  LOCATION=${LOCATION:-$ZONE}
  PROJECT_FLAG=() XPK_LOCATION=()
  if [[ -n $PROJECT ]]; then PROJECT_FLAG=(--project="$PROJECT") XPK_LOCATION=(--project="$PROJECT"); fi
  if [[ -n $ZONE ]]; then XPK_LOCATION+=(--zone="$ZONE"); fi
  if [[ $BACKEND == jobset || $command == logs ]]; then
    [[ -n $LOCATION ]] || die "--zone or --location (the cluster's) is required for kubectl access"
  fi
  case $command in
    submit) submit ;;
    status) status ;;
    logs) logs ;;
    delete) delete ;;
  esac
}

main "$@"
