#!/usr/bin/env bash
# Delete a TPU made by tpu_create.sh, so it stops costing money. With the queued-resources API the queued
# resource is deleted with --force, which deletes its TPU node first; a direct TPU is deleted by name.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'USAGE'
usage: launch/tpu_delete.sh --name=NAME --zone=ZONE [options]

Delete the TPU (and its queued resource). gcloud asks for confirmation unless --yes.

required:
  --name=NAME              TPU name given to tpu_create.sh
  --zone=ZONE              its zone
options:
  --method=queued|direct   how it was created (default queued, as in tpu_create.sh)
  --yes                    do not ask for confirmation (gcloud --quiet)
  --project=PROJECT        GCP project; default: gcloud's configured project
  --dry-run                print the gcloud command instead of running it (gcloud not needed)
  --help                   this text
USAGE
}

OPT_METHOD=queued OPT_YES=0
SCRIPT_VALUE_FLAGS=(method)
SCRIPT_BOOL_FLAGS=(yes)

main() {
  parse_flags "$@"
  show_help_if_asked usage
  reject_passthrough
  validate_common
  require_match method '^(queued|direct)$' "queued or direct"

  gcloud_scope_flags
  local cmd
  if [[ $OPT_METHOD == queued ]]; then
    cmd=(gcloud compute tpus queued-resources delete "$OPT_NAME" "${GCLOUD_SCOPE[@]}" --force)
  else
    cmd=(gcloud compute tpus tpu-vm delete "$OPT_NAME" "${GCLOUD_SCOPE[@]}")
  fi
  if ((OPT_YES)); then
    cmd+=(--quiet)
  fi
  run_step "${cmd[@]}"
}

main "$@"
