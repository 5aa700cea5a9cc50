#!/usr/bin/env bash
# Put nsjax and its pinned dependencies on every worker of a TPU VM or pod slice.
#
# Every worker of a pod runs the same program, so each needs the same code and the same packages: the code
# goes to ~/nsjax (copied from this checkout, or cloned), the packages into a venv at ~/nsjax_venv. The
# venv's Python comes from uv because the TPU images ship Ubuntu 22.04's Python 3.10, older than the pinned
# jax supports. requirements.txt is installed first, then jax[tpu] at the same jax version to add libtpu.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

UV_VERSION=0.13.8

usage() {
  cat <<'EOF'
usage: launch/tpu_install.sh --name=NAME --zone=ZONE [options]

Install nsjax on all workers: code in ~/nsjax, packages in the venv ~/nsjax_venv.

required:
  --name=NAME              TPU name given to tpu_create.sh
  --zone=ZONE              its zone
code source (default: copy this checkout, without .git and caches):
  --source=DIR             copy DIR instead
  --repo=URL               git clone URL on each worker instead of copying
  --ref=REF                branch or tag to clone (with --repo)
options:
  --worker=WORKERS         all (default), an index, or a list such as 0,2-3
  --jax-version=VERSION    jax[tpu] version; default: the jax== pin in requirements.txt
  --python-version=X.Y     Python of the venv (default 3.11)
  --project=PROJECT        GCP project; default: gcloud's configured project
  --dry-run                print the commands instead of running them (gcloud not needed)
  --help                   this text
EOF
}

OPT_SOURCE="" OPT_REPO="" OPT_REF="" OPT_WORKER=all OPT_JAX_VERSION="" OPT_PYTHON_VERSION=3.11
SCRIPT_VALUE_FLAGS=(source repo ref worker jax-version python-version)

# pinned_jax_version: the version in requirements.txt's `jax==` line, so TPU workers match CPU installs.
pinned_jax_version() {
  local requirements=$REPO_ROOT/requirements.txt
  [[ -f $requirements ]] || die "cannot find $requirements to read the jax pin: pass --jax-version"
  sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' "$requirements" | head -n 1
}

# remote_fetch_commands: replace ~/nsjax on the worker with a fresh clone or the uploaded archive.
remote_fetch_commands() {
  if [[ -n $OPT_REPO ]]; then
    local clone=(git clone --depth=1)
    if [[ -n $OPT_REF ]]; then
      clone+=("--branch=$OPT_REF")
    fi
    clone+=("$OPT_REPO")
    printf '%s' "rm -rf $REMOTE_CODE_DIR; $(remote_words "${clone[@]}") $REMOTE_CODE_DIR"
  else
    # shellcheck disable=SC2016  # expanded on the worker.
    local archive='"$HOME/nsjax-install.tar.gz"'
    printf '%s' "rm -rf $REMOTE_CODE_DIR; mkdir -p $REMOTE_CODE_DIR;" \
      " tar -xzf $archive -C $REMOTE_CODE_DIR; rm -f $archive"
  fi
}

# remote_setup_commands JAX_VERSION: the venv and package steps, run in ~/nsjax on each worker. Fixed text is
# quoted by hand for readability (JAX_VERSION is validated as digits and dots); flag values go through %q.
remote_setup_commands() {
  # shellcheck disable=SC2016  # expanded on the worker.
  local uv='"$HOME/.local/bin/uv"'
  local pip_user_uv
  pip_user_uv=$(remote_words python3 -m pip install --user --quiet "uv==$UV_VERSION")
  printf '%s' \
    "if [ ! -x $REMOTE_VENV_PYTHON ]; then" \
    " $pip_user_uv || $pip_user_uv --break-system-packages;" \
    " $uv venv --seed --python $(remote_words "$OPT_PYTHON_VERSION") $REMOTE_VENV_DIR; fi;" \
    " $REMOTE_VENV_PYTHON -m pip install -r requirements.txt;" \
    " $REMOTE_VENV_PYTHON -m pip install \"jax[tpu]==$1\" -f $LIBTPU_FIND_LINKS;" \
    " echo \"nsjax installed on \$(hostname), jax version:\";" \
    " $REMOTE_VENV_PYTHON -c \"import jax; print(jax.__version__)\""
}

main() {
  parse_flags "$@"
  show_help_if_asked usage
  reject_passthrough
  validate_common
  validate_worker worker
  require_match python-version '^[0-9]+\.[0-9]+$' "a Python version such as 3.11"
  require_match jax-version '^[0-9]+(\.[0-9]+)*$' "a version such as 0.10.2"
  if [[ -n $OPT_REPO && -n $OPT_SOURCE ]]; then
    die "--repo and --source exclude each other: clone with --repo, or copy with --source"
  fi
  if [[ -n $OPT_REF && -z $OPT_REPO ]]; then
    die "--ref needs --repo"
  fi
  local jax_version=$OPT_JAX_VERSION
  if [[ -z $jax_version ]]; then
    jax_version=$(pinned_jax_version)
  fi
  [[ -n $jax_version ]] || die "no jax== line in $REPO_ROOT/requirements.txt: pass --jax-version"

  gcloud_scope_flags
  if [[ -z $OPT_REPO ]]; then
    upload_source
  fi
  tpu_ssh "$OPT_WORKER" "set -euo pipefail; $(remote_fetch_commands); cd $REMOTE_CODE_DIR; $(remote_setup_commands "$jax_version")"
}

# upload_source: pack the source tree (without VCS data and caches) and copy it to the workers' $HOME.
upload_source() {
  local source_dir=${OPT_SOURCE:-$REPO_ROOT}
  [[ -d $source_dir ]] || die "--source=$source_dir is not a directory"
  local archive=${TMPDIR:-/tmp}
  archive="${archive%/}/nsjax-install-$OPT_NAME.tar.gz"
  run_step tar --exclude=.git --exclude=__pycache__ --exclude='*.pyc' --exclude=.pytest_cache \
    --exclude=.venv --exclude=venv -czf "$archive" -C "$source_dir" .
  run_step gcloud compute tpus tpu-vm scp "$archive" "$OPT_NAME:nsjax-install.tar.gz" "${GCLOUD_SCOPE[@]}" \
    "--worker=$OPT_WORKER"
  if ((!OPT_DRY_RUN)); then
    rm -f "$archive"
  fi
}

main "$@"
