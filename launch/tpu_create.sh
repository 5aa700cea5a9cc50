#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice, through the queued-resources API (default: waits in a queue for
# capacity, the only way to get best-effort capacity and the dependable one for pod slices) or a direct
# `tpu-vm create` (fails at once when the zone has no capacity).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
usage: launch/tpu_create.sh --name=NAME --zone=ZONE --accelerator-type=TYPE [options]

Create a Cloud TPU VM (v3-8) or pod slice (v4-32, ...).

required:
  --name=NAME                TPU (node) name, e.g. nsjax-v4-32; also the queued-resource id
  --zone=ZONE                e.g. us-central2-b (v4), europe-west4-a (v3)
  --accelerator-type=TYPE    e.g. v3-8, v4-32, v5litepod-16, v5p-8, v6e-8
options:
  --runtime-version=VERSION  TPU software image; default picked from the accelerator family
                             (v2/v3/v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite,
                             v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --method=queued|direct     queued: gcloud compute tpus queued-resources create (default)
                             direct: gcloud compute tpus tpu-vm create
  --spot                     Spot capacity (cheaper, preemptible)
  --best-effort              best-effort capacity (queued only; uses `gcloud alpha`)
  --project=PROJECT          GCP project; default: gcloud's configured project
  --dry-run                  print the gcloud command instead of running it (gcloud not needed)
  --help                     this text
EOF
}

OPT_ACCELERATOR_TYPE="" OPT_RUNTIME_VERSION="" OPT_METHOD=queued OPT_SPOT=0 OPT_BEST_EFFORT=0
SCRIPT_VALUE_FLAGS=(accelerator-type runtime-version method)
SCRIPT_BOOL_FLAGS=(spot best-effort)

# default_runtime_version TYPE: the base image for the accelerator family, or nothing when unknown.
default_runtime_version() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "" ;;
  esac
}

main() {
  parse_flags "$@"
  show_help_if_asked usage
  reject_passthrough
  validate_common
  require accelerator-type
  require_match accelerator-type '^v[0-9]+[a-z]*-[0-9]+$' "a TPU type such as v3-8 or v4-32"
  require_match method '^(queued|direct)$' "queued or direct"
  if ((OPT_SPOT && OPT_BEST_EFFORT)); then
    die "--spot and --best-effort exclude each other: pick one"
  fi
  if ((OPT_BEST_EFFORT)) && [[ $OPT_METHOD == direct ]]; then
    die "--best-effort needs the queued-resources API: drop --method=direct"
  fi
  local runtime_version=${OPT_RUNTIME_VERSION:-$(default_runtime_version "$OPT_ACCELERATOR_TYPE")}
  [[ -n $runtime_version ]] ||
    die "no default runtime version for --accelerator-type=$OPT_ACCELERATOR_TYPE: pass --runtime-version"

  gcloud_scope_flags
  local cmd
  if [[ $OPT_METHOD == queued ]]; then
    cmd=(gcloud)
    ((OPT_BEST_EFFORT)) && cmd+=(alpha)
    cmd+=(compute tpus queued-resources create "$OPT_NAME" "--node-id=$OPT_NAME" "${GCLOUD_SCOPE[@]}"
      "--accelerator-type=$OPT_ACCELERATOR_TYPE" "--runtime-version=$runtime_version")
    ((OPT_BEST_EFFORT)) && cmd+=(--best-effort)
  else
    cmd=(gcloud compute tpus tpu-vm create "$OPT_NAME" "${GCLOUD_SCOPE[@]}"
      "--accelerator-type=$OPT_ACCELERATOR_TYPE" "--version=$runtime_version")
  fi
  ((OPT_SPOT)) && cmd+=(--spot)
  run_step "${cmd[@]}"

  if ((!OPT_DRY_RUN)) && [[ $OPT_METHOD == queued ]]; then
    printf '%s\n' "queued. Wait for state ACTIVE:" \
      "  $(shell_quote gcloud compute tpus queued-resources describe "$OPT_NAME" "${GCLOUD_SCOPE[@]}")" \
      "then: launch/tpu_install.sh --name=$OPT_NAME --zone=$OPT_ZONE" >&2
  fi
}

main "$@"
