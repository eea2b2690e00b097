# shellcheck shell=bash
# Shared by launch/tpu_vm.sh and launch/gke.sh (sourced, never run): option parsing, validation,
# dry-run aware execution and the `nextstep-jax train` argument list. Needs bash >= 4.4.
#
# Conventions: commands go through `run` (printed, one per line and shell-quoted, under --dry-run;
# traced to stderr and executed otherwise); messages go to stderr; errors are one line and exit 2.

if ((BASH_VERSINFO[0] < 4 || (BASH_VERSINFO[0] == 4 && BASH_VERSINFO[1] < 4))); then
  echo "error: bash >= 4.4 is required (this is $BASH_VERSION; on macOS: brew install bash)" >&2
  exit 2
fi

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")
STAGES=(stage1_256px stage2_512px anneal_512px sft edit dpo)
DRY_RUN_MAX_POLLS=50

# Options every script takes (parse_args fills them; the sourcing script reads them).
# shellcheck disable=SC2034
DRY_RUN=0 WORKDIR="" STAGE="" CONFIG="" NUM_SLICES=1 ACCEL="" PROJECT="" ZONE="" NAME=""
OVERRIDES=()    # --config.a.b=value arguments, passed on to `nextstep-jax train`
EXTRA_TRAIN=()  # everything after `--`, passed on to `nextstep-jax train`
POLLS=0

die() { echo "$PROG: error: $*" >&2; exit 2; }
warn() { echo "$PROG: warning: $*" >&2; }
info() { echo "$PROG: $*" >&2; }

# Quote one word for a POSIX shell only where needed (the same rule as Python's shlex.quote).
shq() {
  if [[ -n $1 && $1 != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Wrap a string in double quotes for a remote shell (escapes \ $ ` and ").
dq() {
  local s=${1//\\/\\\\}
  s=${s//\$/\\\$}
  s=${s//\`/\\\`}
  printf '"%s"' "${s//\"/\\\"}"
}

quote_cmd() {
  local out="" word
  for word in "$@"; do out+="${out:+ }$(shq "$word")"; done
  printf '%s' "$out"
}

show() {  # show CMD...: print it (stdout) under --dry-run, else trace it (stderr)
  if ((DRY_RUN)); then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    echo "+ $(quote_cmd "$@")" >&2
  fi
}

run() {  # run CMD...: show it, and execute it unless --dry-run
  show "$@"
  if ((!DRY_RUN)); then "$@"; fi
}

run_stdin() {  # run_stdin TEXT CMD...: CMD reads TEXT on stdin (printed as a here-document)
  local text=$1
  shift
  if ((DRY_RUN)); then
    printf "%s <<'EOF'\n%s\nEOF\n" "$(quote_cmd "$@")" "$text"
    return 0
  fi
  echo "+ $(quote_cmd "$@") <<'EOF' ... EOF" >&2
  "$@" <<<"$text"
}

# query VAR STUB DRY_DEFAULT CMD...: set VAR to the last line CMD prints ("" if it fails).
# STUB (an executable's path, from an env var) answers instead of CMD, even under --dry-run;
# without one, --dry-run prints CMD and answers DRY_DEFAULT.
query() {
  local var=$1 stub=$2 default=$3 answer=""
  shift 3
  show "$@"
  if [[ -n $stub ]]; then
    answer=$("$stub" | tail -n 1) || answer=""
  elif ((DRY_RUN)); then
    answer=$default
  else
    answer=$("$@" | tail -n 1) || answer=""
  fi
  printf -v "$var" '%s' "$answer"
}

pause() {  # pause SECONDS: sleep between polls (printed under --dry-run, which stops a runaway loop)
  POLLS=$((POLLS + 1))
  if ((DRY_RUN && POLLS > DRY_RUN_MAX_POLLS)); then
    die "dry-run: stopping after $DRY_RUN_MAX_POLLS polls"
  fi
  run sleep "$1"
}

# ---- options ---------------------------------------------------------------------------------

optval() {  # optval VAR "$@": VAR=$2 (the option's value) and consume two words
  (($# >= 3)) || die "$2 needs a value"
  printf -v "$1" '%s' "$3"
  SHIFT_BY=2
}

parse_common_option() {  # returns 1 when $1 is not a common option
  case $1 in
    --dry-run) DRY_RUN=1 ;;
    --workdir) optval WORKDIR "$@" ;;
    --stage) optval STAGE "$@" ;;
    --config) optval CONFIG "$@" ;;
    --num-slices) optval NUM_SLICES "$@" ;;
    --accelerator-type | --tpu-type) optval ACCEL "$@" ;;
    --project) optval PROJECT "$@" ;;
    --zone) optval ZONE "$@" ;;
    --name) optval NAME "$@" ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# parse_args "$@": common options, then the calling script's parse_option (which returns 1 for
# an option it does not know). Accepts `--opt value` and `--opt=value`.
parse_args() {
  while (($#)); do
    case $1 in
      --config.*) OVERRIDES+=("$1"); shift; continue ;;
      --) shift; EXTRA_TRAIN+=("$@"); break ;;
      --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    esac
    SHIFT_BY=1
    parse_common_option "$@" || parse_option "$@" || die "unknown option '$1' (see $PROG --help)"
    shift "$SHIFT_BY"
  done
}

usage() {  # print the calling script's header comment (its usage)
  sed -n '2,/^$/{/^#/s/^# \{0,1\}//p}' "$0"
}

# ---- validation ------------------------------------------------------------------------------

default_name() {  # NAME from --stage when not given: nextstep-stage1-256px
  if [[ -z $NAME && -n $STAGE ]]; then NAME="nextstep-${STAGE//_/-}"; fi
  [[ -n $NAME ]] || die "--name is required (or --stage, to derive one)"
  [[ $NAME =~ ^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$ ]] ||
    die "--name '$NAME' must be lowercase letters, digits and '-', start with a letter, <= 40 chars"
}

validate_accelerator() {
  [[ -n $ACCEL ]] || die "--accelerator-type is required (e.g. v5p-256)"
  [[ $ACCEL =~ ^(v2|v3|v4|v5p|v5litepod|v6e)-[1-9][0-9]*$ ]] ||
    die "unknown accelerator type '$ACCEL' (expected GENERATION-SIZE, e.g. v4-128, v5p-256, v5litepod-64, v6e-256)"
}

validate_slices() {
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be an integer >= 1 (got '$NUM_SLICES')"
}

validate_train() {  # what every launch of `nextstep-jax train` needs
  [[ -n $WORKDIR ]] || die "--workdir is required (a gs:// path every host can reach, e.g. gs://BUCKET/RUN)"
  if [[ $WORKDIR != gs://?* ]]; then
    warn "--workdir '$WORKDIR' is not a gs:// path; multi-host training needs storage shared by every host"
  fi
  validate_slices
  if [[ -n $STAGE && -n $CONFIG ]]; then die "give --stage or --config, not both"; fi
  if [[ -n $STAGE ]]; then
    [[ " ${STAGES[*]} " == *" $STAGE "* ]] || die "unknown stage '$STAGE' (one of: ${STAGES[*]})"
    CONFIG=configs/nextstep1_14b/$STAGE.py
  fi
  [[ -n $CONFIG ]] || die "--stage or --config is required"
  [[ -f $REPO_ROOT/$CONFIG ]] || warn "config '$CONFIG' is not in this checkout ($REPO_ROOT)"
  local o
  for o in "${OVERRIDES[@]}"; do
    if [[ $o == --config.mesh.dcn_data=* && ${o#*=} != "$NUM_SLICES" ]]; then
      die "$o contradicts --num-slices $NUM_SLICES (the launcher sets dcn_data from --num-slices)"
    fi
  done
  default_name
}

# TRAIN_ARGS: the arguments of `nextstep-jax` for this run (the caller prepends the executable).
train_args() {
  TRAIN_ARGS=(train --config "$CONFIG" --workdir "$WORKDIR" --multihost)
  if ((NUM_SLICES > 1)) && [[ " ${OVERRIDES[*]} " != *" --config.mesh.dcn_data="* ]]; then
    TRAIN_ARGS+=("--config.mesh.dcn_data=$NUM_SLICES")
  fi
  TRAIN_ARGS+=("${OVERRIDES[@]}" "${EXTRA_TRAIN[@]}")
}
