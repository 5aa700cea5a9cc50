#!/usr/bin/env bash
# Start `python -m nsjax.main --config=... --workdir=...` on every worker of a TPU VM or pod slice.
#
# A pod slice runs one process per worker, all started together; jax joins them into one job. The runs go
# into the background under nohup, with output in ~/nsjax_logs/<log-name>.log on each worker (and
# ~/nsjax_logs/latest.log pointing at it), so closing the ssh session or laptop does not stop training.
# Flag values travel through two shells (here and the worker's), so each word is quoted with printf %q.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_run.sh --name=NAME --zone=ZONE --config=CONFIG --workdir=gs://... [options] [-- ARGS...]

Start nsjax on all workers in the background; follow it with launch/tpu_logs.sh.
Runs in ~/nsjax on each worker: python -m nsjax.main --config=CONFIG --workdir=WORKDIR --distributed ARGS...

required:
  --name=NAME              TPU name given to tpu_create.sh
  --zone=ZONE              its zone
  --config=CONFIG          config file, relative to the nsjax checkout, e.g. configs/imagenet_b0.py
  --workdir=DIR            output directory; on a pod slice it must be shared: gs://bucket/path
options:
  --tfds-data-dir=DIR      sets TFDS_DATA_DIR on the workers, e.g. gs://bucket/tensorflow_datasets
  --env=KEY=VALUE          another environment variable for the run (repeatable)
  --worker=WORKERS         all (default); a subset only makes sense on a single-host TPU
  --log-name=NAME          log file name (default: CONFIG stem and UTC time, e.g. imagenet_b0-20250101-120000)
  --project=PROJECT        GCP project; default: gcloud's configured project
  --dry-run                print the gcloud command instead of running it (gcloud not needed)
  --help                   this text
  -- ARGS...               passed on to nsjax.main, e.g. -- --stage=label-1
EOF
}

OPT_CONFIG="" OPT_WORKDIR="" OPT_TFDS_DATA_DIR="" OPT_WORKER=all OPT_LOG_NAME=""
OPT_ENV=()
SCRIPT_VALUE_FLAGS=(config workdir tfds-data-dir worker log-name)
SCRIPT_LIST_FLAGS=(env)
UNKNOWN_FLAG_HINT="arguments for nsjax.main go after --, e.g. launch/tpu_run.sh ... -- --stage=label-1"

# default_log_name: CONFIG's file stem plus a UTC time stamp, kept to file-name-safe characters.
default_log_name() {
  local stem=${OPT_CONFIG%%:*}
  stem=${stem##*/}
  stem=${stem%.py}
  stem=${stem//[!A-Za-z0-9._-]/_}
  printf '%s-%s' "${stem:-run}" "$(date -u +%Y%m%d-%H%M%S)"
}

check_inputs() {
  validate_common
  validate_worker worker
  require config
  require workdir
  require_match log-name '^[A-Za-z0-9._-]+$' "a file name of letters, digits, '.', '_' and '-'"
  local pair
  for pair in ${OPT_ENV[@]+"${OPT_ENV[@]}"}; do
    [[ $pair =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env='$pair' is not valid: expected KEY=VALUE"
  done
  if [[ $OPT_WORKDIR != gs://* ]]; then
    warn "--workdir=$OPT_WORKDIR is not on GCS: every worker of a pod slice must write to the same gs:// directory"
  fi
  # ml_collections config flags may carry an argument after ':' (configs/x.py:b0); check the file part.
  if [[ ! -f $REPO_ROOT/${OPT_CONFIG%%:*} ]]; then
    warn "--config=$OPT_CONFIG is not in this checkout ($REPO_ROOT); it must exist in ~/nsjax on the workers"
  fi
}

# remote_run_command LOG_NAME: the worker-side script; every flag value in it goes through printf %q.
remote_run_command() {
  local env_words=()
  if [[ -n $OPT_TFDS_DATA_DIR ]]; then
    env_words+=("TFDS_DATA_DIR=$OPT_TFDS_DATA_DIR")
  fi
  env_words+=(${OPT_ENV[@]+"${OPT_ENV[@]}"})
  local env_prefix=""
  if ((${#env_words[@]} > 0)); then
    env_prefix="env $(remote_words "${env_words[@]}") "
  fi
  local program
  program=$(remote_words -m nsjax.main "--config=$OPT_CONFIG" "--workdir=$OPT_WORKDIR" --distributed \
    ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
  # shellcheck disable=SC2016  # $logs, $run, $! and $(hostname) belong to the worker's shell.
  printf '%s' "set -euo pipefail; logs=$REMOTE_LOG_DIR; run=$(remote_words "$1");" \
    ' if [ ! -x '"$REMOTE_VENV_PYTHON"' ]; then' \
    ' echo "nsjax is not installed on $(hostname): run launch/tpu_install.sh first" >&2; exit 1; fi;' \
    " cd $REMOTE_CODE_DIR; mkdir -p \"\$logs\";" \
    " nohup $env_prefix$REMOTE_VENV_PYTHON $program" ' > "$logs/$run.log" 2>&1 < /dev/null &' \
    ' echo $! > "$logs/$run.pid";' \
    ' ln -sfn "$run.log" "$logs/latest.log"; ln -sfn "$run.pid" "$logs/latest.pid";' \
    ' echo "started on $(hostname): pid $!, log $logs/$run.log"'
}

main() {
  parse_flags "$@"
  show_help_if_asked usage
  check_inputs
  local log_name=${OPT_LOG_NAME:-$(default_log_name)}
  tpu_ssh "$OPT_WORKER" "$(remote_run_command "$log_name")"
}

main "$@"
