# shellcheck shell=bash disable=SC2034  # the globals here are read by the scripts that source this file
# Shared helpers for the launch/ scripts: flag parsing, validation, quoting, and the dry-run switch.
#
# Sourced, never run. Each script declares the flags it accepts, assigns their defaults as OPT_* variables,
# calls parse_flags "$@", validates, and hands every external command to run_step so that --dry-run can
# print it instead. Quoting happens in two layers, and both matter:
#   - remote_words: printf %q, for text that bash on a TPU worker parses (the --command string);
#   - shell_quote: POSIX single quotes, for the commands --dry-run prints, so they paste into any shell.
# Avoids bash-4-only features (namerefs, ${x^^}, mapfile) so the scripts can run under macOS's bash 3.2;
# only bash 5 is tested.

set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd -P)

# Where things live on every TPU worker, relative to the remote $HOME (ssh sessions start there). These are
# written into remote commands unquoted on purpose so the remote shell expands $HOME.
# shellcheck disable=SC2016  # single quotes: expanded remotely, not here.
REMOTE_CODE_DIR='"$HOME/nsjax"'
# shellcheck disable=SC2016
REMOTE_VENV_DIR='"$HOME/nsjax_venv"'
# shellcheck disable=SC2016
REMOTE_VENV_PYTHON='"$HOME/nsjax_venv/bin/python"'
# shellcheck disable=SC2016
REMOTE_LOG_DIR='"$HOME/nsjax_logs"'
LIBTPU_FIND_LINKS=https://storage.googleapis.com/jax-releases/libtpu_releases.html

# Flags every script accepts. Scripts add theirs to SCRIPT_VALUE_FLAGS / SCRIPT_BOOL_FLAGS / SCRIPT_LIST_FLAGS.
OPT_NAME="" OPT_ZONE="" OPT_PROJECT="" OPT_DRY_RUN=0 OPT_HELP=0
COMMON_VALUE_FLAGS=(name zone project)
COMMON_BOOL_FLAGS=(dry-run help)
SCRIPT_VALUE_FLAGS=()
SCRIPT_BOOL_FLAGS=()
SCRIPT_LIST_FLAGS=()
# Arguments after a bare `--`, for scripts that pass them on (tpu_run.sh); others reject them.
PASSTHROUGH=()
# Extra advice appended to the "unknown flag" error (tpu_run.sh uses it to point at `--`).
UNKNOWN_FLAG_HINT=""

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

warn() {
  printf 'warning: %s\n' "$*" >&2
}

# contains WORD LIST... -> success when WORD is one of LIST.
contains() {
  local word=$1 item
  shift
  for item in "$@"; do
    [[ $item == "$word" ]] && return 0
  done
  return 1
}

# opt_var FLAG -> the variable that holds it: accelerator-type -> OPT_ACCELERATOR_TYPE.
opt_var() {
  printf 'OPT_%s' "$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
}

# parse_flags "$@": accepts --flag VALUE and --flag=VALUE for value flags, --flag for booleans, repeats for
# list flags (appended to the OPT_* array), and stops at `--`, keeping the rest in PASSTHROUGH.
parse_flags() {
  local value_flags=("${COMMON_VALUE_FLAGS[@]}" ${SCRIPT_VALUE_FLAGS[@]+"${SCRIPT_VALUE_FLAGS[@]}"})
  local bool_flags=("${COMMON_BOOL_FLAGS[@]}" ${SCRIPT_BOOL_FLAGS[@]+"${SCRIPT_BOOL_FLAGS[@]}"})
  local list_flags=(${SCRIPT_LIST_FLAGS[@]+"${SCRIPT_LIST_FLAGS[@]}"})
  local arg key value has_value var
  while (($# > 0)); do
    arg=$1
    shift
    case $arg in
      --)
        PASSTHROUGH=("$@")
        return 0
        ;;
      --*=*)
        key=${arg%%=*}
        key=${key#--}
        value=${arg#*=}
        has_value=1
        ;;
      --?*)
        key=${arg#--}
        value=""
        has_value=0
        ;;
      *)
        die "unexpected argument '$arg': flags look like --flag=VALUE (see --help)"
        ;;
    esac
    var=$(opt_var "$key")
    if contains "$key" "${bool_flags[@]}"; then
      ((has_value == 0)) || die "--$key takes no value (got '--$key=$value')"
      printf -v "$var" '%s' 1
      continue
    fi
    if ! contains "$key" "${value_flags[@]}" && ! contains "$key" ${list_flags[@]+"${list_flags[@]}"}; then
      die "unknown flag --$key (see --help)${UNKNOWN_FLAG_HINT:+; $UNKNOWN_FLAG_HINT}"
    fi
    if ((has_value == 0)); then
      if (($# == 0)) || [[ $1 == --* ]]; then
        die "--$key needs a value: --$key=VALUE"
      fi
      value=$1
      shift
    fi
    if contains "$key" ${list_flags[@]+"${list_flags[@]}"}; then
      eval "$var+=(\"\$value\")"
    else
      printf -v "$var" '%s' "$value"
    fi
  done
}

# show_help_if_asked USAGE_FUNCTION: --help wins over every other check.
show_help_if_asked() {
  if ((OPT_HELP)); then
    "$1"
    exit 0
  fi
}

# require FLAG: fail with the flag's name when its value is empty.
require() {
  local var
  var=$(opt_var "$1")
  [[ -n ${!var} ]] || die "--$1 is required (see --help)"
}

# require_match FLAG REGEX WHAT: fail with the allowed shape when a set value does not match.
require_match() {
  local var
  var=$(opt_var "$1")
  [[ -z ${!var} || ${!var} =~ $2 ]] || die "--$1='${!var}' is not valid: expected $3"
}

reject_passthrough() {
  ((${#PASSTHROUGH[@]} == 0)) || die "this script takes no arguments after --"
}

# The checks every script shares: a TPU name gcloud accepts, a zone, a plausible project id.
validate_common() {
  require name
  require zone
  require_match name '^[a-z]([-a-z0-9]*[a-z0-9])?$' \
    "a TPU name: lower-case letters, digits and '-', starting with a letter, e.g. --name=nsjax-v4-32"
  require_match zone '^[a-z]+-[a-z]+[0-9]+-[a-z]$' "a zone such as us-central2-b"
  require_match project '^[a-z][-a-z0-9:.]*$' "a project id such as my-project"
}

# validate_worker FLAG: what gcloud's --worker accepts with --command: all, N, or lists/ranges like 0,2-3.
validate_worker() {
  require "$1"
  require_match "$1" '^(all|[0-9]+([-,][0-9]+)*)$' "all, a worker index such as 0, or a list such as 0,2-3"
}

# shell_quote WORD...: the words as one line a POSIX shell reads back as the same words.
shell_quote() {
  local out="" word quoted rest
  for word in "$@"; do
    if [[ -n $word && $word != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
      quoted=$word
    else
      # Close the quote, emit an escaped quote, reopen: ' -> '\''.
      quoted="'"
      rest=$word
      while [[ $rest == *"'"* ]]; do
        quoted+="${rest%%"'"*}'\\''"
        rest=${rest#*"'"}
      done
      quoted+="$rest'"
    fi
    out+="${out:+ }$quoted"
  done
  printf '%s\n' "$out"
}

# remote_words WORD...: the words quoted with printf %q for bash on the worker, joined by spaces.
remote_words() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(printf '%q' "$word")"
  done
  printf '%s' "$out"
}

# gcloud_scope_flags: the --zone and optional --project flags every gcloud call here takes.
gcloud_scope_flags() {
  GCLOUD_SCOPE=("--zone=$OPT_ZONE")
  if [[ -n $OPT_PROJECT ]]; then
    GCLOUD_SCOPE+=("--project=$OPT_PROJECT")
  fi
}

# run_step CMD...: print CMD under --dry-run; otherwise echo it to stderr and run it.
run_step() {
  if ((OPT_DRY_RUN)); then
    shell_quote "$@"
    return 0
  fi
  if [[ $1 == gcloud ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud is not on PATH: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or add --dry-run to only print the commands"
  fi
  printf '+ %s' "$(shell_quote "$@")" >&2
  printf '\n' >&2
  "$@"
}

# tpu_ssh WORKER REMOTE_COMMAND: run a command on the named workers of the TPU.
tpu_ssh() {
  gcloud_scope_flags
  run_step gcloud compute tpus tpu-vm ssh "$OPT_NAME" "${GCLOUD_SCOPE[@]}" "--worker=$1" --command "$2"
}
