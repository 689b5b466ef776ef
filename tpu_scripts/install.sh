#!/usr/bin/env bash
# Put the repository on every worker of the slice and install it into a venv with TPU JAX.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu_scripts/install.sh [--extras LIST] [--no-check] [--no-apt-python] [-h]

On every worker of \$TPU_NAME (concurrently):
  1. the code: git clone \$REPO_URL (branch \$REPO_BRANCH) into ~/\$REMOTE_DIR, or, without
     REPO_URL, copy \$REPO_TARBALL (default: a tarball of this local checkout, without
     .git, .venv, runs/ and checkpoints/) and unpack it there;
  2. Python >= 3.11: \$PYTHON (default python3); if it is older (Ubuntu 22.04 TPU images
     ship 3.10), install python3.11 + python3.11-venv with apt-get unless --no-apt-python;
  3. \$REMOTE_DIR/.venv with: pip install -c constraints.txt -e ".[EXTRAS]" "jax[tpu]==0.10.2"
     constraints.txt pins jax/jaxlib 0.10.2. The jaxlib wheel is the same for CPU and TPU;
     TPU support comes from the libtpu package that the jax[tpu] extra pins to the release
     matching jax 0.10.2, so the pinned jaxlib stays and libtpu is added;
  4. unless --no-check: print jax.device_count() on every worker (all at once, as a pod
     slice needs every host to initialise the TPU runtime).

options:
  --extras LIST     optional dependency groups of pyproject.toml (default: hf, which the
                    tldr preset needs for HF data sets; "" for none). Leave out "parity":
                    it pulls torch, only needed by the parity tests.
  --no-check        skip the device check
  --no-apt-python   never apt-get a newer Python; fail if \$PYTHON is older than 3.11
  -h, --help        this text (runs nothing)

environment: TPU_NAME ZONE PROJECT REPO_URL REPO_BRANCH REPO_TARBALL REMOTE_DIR PYTHON
             DRY_RUN=1 prints the gcloud commands instead of running them.
Re-running is safe: the clone is updated (git fetch + checkout), the tarball re-unpacked
over the old tree, and pip only installs what changed.
EOF
}

extras="hf" check=1 apt_python=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --extras) [[ $# -ge 2 ]] || die "--extras needs a value"; extras="$2"; shift ;;
    --no-check) check=0 ;;
    --no-apt-python) apt_python=0 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done

resolve_config
rdir="$(printf '%q' "$REMOTE_DIR")"

# 1. the code
if [[ -n "$REPO_URL" ]]; then
  url="$(printf '%q' "$REPO_URL")" branch="$(printf '%q' "$REPO_BRANCH")"
  log "cloning $REPO_URL ($REPO_BRANCH) into ~/$REMOTE_DIR on every worker"
  tpu_ssh_all "set -e; if [ -d $rdir/.git ]; then git -C $rdir fetch --depth 1 origin $branch \
&& git -C $rdir checkout -q FETCH_HEAD; else git clone --depth 1 --branch $branch $url $rdir; fi"
else
  tarball="$REPO_TARBALL"
  if [[ -z "$tarball" ]]; then
    tmpdir="$(mktemp -d)"
    trap 'rm -rf "$tmpdir"' EXIT
    tarball="$tmpdir/rlhf_jax_src.tar.gz"
    log "packing $REPO_ROOT into $tarball"
    tar -czf "$tarball" -C "$REPO_ROOT" --exclude=.git --exclude=.venv --exclude=runs \
      --exclude=checkpoints --exclude='__pycache__' --exclude='*.egg-info' \
      --exclude=.pytest_cache .
  fi
  [[ -f "$tarball" ]] || die "REPO_TARBALL=$tarball does not exist"
  log "copying $(basename "$tarball") to every worker"
  tpu_scp_to_all "$tarball" "rlhf_jax_src.tar.gz"
  tpu_ssh_all "set -e; mkdir -p $rdir && tar -xzf rlhf_jax_src.tar.gz -C $rdir && rm -f rlhf_jax_src.tar.gz"
fi

# 2. + 3. Python, venv and packages
py="$(printf '%q' "$PYTHON")"
spec=".[${extras}]"
[[ -z "$extras" ]] && spec="."
spec_q="$(printf '%q' "$spec")"
read -r -d '' remote_install <<EOF || true
set -e
cd $rdir
PY=$py
if ! \$PY -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  if [ $apt_python = 1 ]; then
    echo "\$(hostname): \$PY is older than 3.11; installing python3.11 with apt-get"
    sudo DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv
    PY=python3.11
  else
    echo "\$(hostname): \$PY is older than 3.11 (rlhf_jax needs >= 3.11)" >&2; exit 1
  fi
fi
[ -x .venv/bin/python ] || \$PY -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e $spec_q "jax[tpu]==0.10.2"
echo "\$(hostname): installed \$(.venv/bin/python -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__)')"
EOF
log "installing the venv on every worker (extras: ${extras:-none})"
tpu_ssh_all "$remote_install"

# 4. device check
if [[ "$check" == 1 ]]; then
  log "device check (all workers at once)"
  tpu_ssh_all "cd $rdir && .venv/bin/python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.local_device_count(), jax.devices()[0].device_kind)'"
fi
log "next: tpu_scripts/launch.sh"
