#!/usr/bin/env bash
# Follow the log of the latest (or a named) tpu_run.sh run on worker 0, or on several workers at once.
#
# Worker 0 is enough to watch training (every worker logs the same progress); following all of them helps
# when one worker fails. Lines from several workers arrive interleaved, so each gets its host name in front.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_logs.sh --name=NAME --zone=ZONE [options]

Follow ~/nsjax_logs/latest.log (written by launch/tpu_run.sh) on worker 0, or on the workers given.

required:
  --name=NAME          TPU name given to tpu_create.sh
  --zone=ZONE          its zone
options:
  --worker=WORKERS     0 (default), another index, all, or a list such as 0,2-3
  --log-name=NAME      a run's --log-name instead of the latest run
  --lines=N            lines of history to show first (default 100)
  --no-follow          print the last lines and exit instead of following
  --project=PROJECT    GCP project; default: gcloud's configured project
  --dry-run            print the gcloud command instead of running it (gcloud not needed)
  --help               this text
USAGE
}

OPT_WORKER=0 OPT_LOG_NAME=latest OPT_LINES=100 OPT_NO_FOLLOW=0
SCRIPT_VALUE_FLAGS=(worker log-name lines)
SCRIPT_BOOL_FLAGS=(no-follow)

main() {
  parse_flags "$@"
  show_help_if_asked usage
  reject_passthrough
  validate_common
  validate_worker worker
  require_match log-name '^[A-Za-z0-9._-]+$' "a file name of letters, digits, '.', '_' and '-'"
  require_match lines '^[0-9]+$' "a number of lines"

  local tail_words=(tail -n "$OPT_LINES")
  if ((!OPT_NO_FOLLOW)); then
    tail_words+=(-F)  # -F, not -f: keeps following when a new run repoints latest.log
  fi
  local command
  command="$(remote_words "${tail_words[@]}") $REMOTE_LOG_DIR/$(remote_words "$OPT_LOG_NAME.log")"
  if [[ ! $OPT_WORKER =~ ^[0-9]+$ ]]; then
    # shellcheck disable=SC2016  # $(hostname) runs on the worker.
    command+=' | sed -u "s/^/[$(hostname)] /"'
  fi
  tpu_ssh "$OPT_WORKER" "$command"
}

main "$@"
