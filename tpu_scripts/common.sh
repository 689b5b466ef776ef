#!/usr/bin/env bash
# Shared settings and helpers of the Cloud TPU VM scripts. Sourced, never run:
#
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Nothing here calls gcloud at source time, so every script can print its usage (-h)
# without a cloud account. Settings come from the environment (see tpu_scripts/README.md):
#
#   TPU_NAME          name of the TPU VM / slice                     (default: rlhf-jax)
#   ZONE              zone of the slice      (default: gcloud config compute/zone)
#   PROJECT           Google Cloud project   (default: gcloud config core/project)
#   ACCELERATOR_TYPE  slice type, e.g. v5litepod-8, v5litepod-16, v4-32, v6e-8
#                                                                    (default: v5litepod-16)
#   RUNTIME_VERSION   TPU VM software version (default: derived from ACCELERATOR_TYPE)
#   REPO_URL          git URL to clone on the workers; unset: copy the local checkout
#   REPO_BRANCH       branch / tag to check out with REPO_URL        (default: main)
#   REPO_TARBALL      a local .tar.gz of the repository to copy instead of cloning
#   REMOTE_DIR        repository directory on every worker           (default: rlhf_jax,
#                     relative to the worker's home directory)
#   PYTHON            interpreter for the venv on the workers, >= 3.11 (default: python3)
#   RUN_NAME          name of a run: log ~/rlhf_runs/$RUN_NAME.log on each worker
#                                                                    (default: rlhf-run)
#   OUT_DIR           pipeline output directory on the workers; must be shared storage
#                     (same path on every worker) for multi-host slices and for spot VMs
#   NUM_WORKERS       number of hosts of the slice (default: asked from gcloud when needed)
#   MAX_RESUBMITS     launch.sh: how many times a run that exits with EXIT_PREEMPTED (75) is
#                     started again with --resume on the same worker          (default: 3)
#   DRY_RUN=1         print the gcloud commands instead of running them
# shellcheck disable=SC2034  # variables here are used by the scripts that source this file

set -euo pipefail

TPU_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TPU_SCRIPTS_DIR/.." && pwd)"

TPU_NAME="${TPU_NAME:-rlhf-jax}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-16}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
REPO_URL="${REPO_URL:-}"
REPO_BRANCH="${REPO_BRANCH:-main}"
REPO_TARBALL="${REPO_TARBALL:-}"
REMOTE_DIR="${REMOTE_DIR:-rlhf_jax}"
PYTHON="${PYTHON:-python3}"
RUN_NAME="${RUN_NAME:-rlhf-run}"
OUT_DIR="${OUT_DIR:-}"
NUM_WORKERS="${NUM_WORKERS:-}"
MAX_RESUBMITS="${MAX_RESUBMITS:-3}"
DRY_RUN="${DRY_RUN:-0}"

# Exit statuses of `rlhf-jax` (rlhf_jax.train.loop.exit_code; see tpu_scripts/README.md).
EXIT_OK=0
EXIT_PREEMPTED=75   # SIGTERM received, checkpoint saved: resubmit (EX_TEMPFAIL)
EXIT_NON_FINITE=76  # NaN/Inf loss, gradient norm or state; the newest checkpoint is finite
EXIT_STALLED=77     # loss unchanged with a zero gradient norm (--loop stall_steps)

# Where launch.sh keeps a run's log, pid and output-directory files on every worker
# (relative to the worker's home directory).
REMOTE_RUNS_DIR="rlhf_runs"

log() { printf '[tpu_scripts] %s\n' "$*" >&2; }
die() { printf '[tpu_scripts] error: %s\n' "$*" >&2; exit 1; }

# Runtime version for an accelerator type (the TPU VM base images per generation; check the
# Cloud TPU documentation when a new generation or image appears and set RUNTIME_VERSION).
default_runtime_version() {
  case "$1" in
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    *) return 1 ;;
  esac
}

# Fill ZONE / PROJECT / RUNTIME_VERSION and check the names the command needs. Call after the
# usage has been handled: it may ask gcloud for its configured defaults.
resolve_config() {
  if [[ -z "$ZONE" && "$DRY_RUN" != 1 ]]; then
    ZONE="$(gcloud config get-value compute/zone 2>/dev/null || true)"
  fi
  if [[ -z "$PROJECT" && "$DRY_RUN" != 1 ]]; then
    PROJECT="$(gcloud config get-value project 2>/dev/null || true)"
  fi
  [[ -n "$TPU_NAME" ]] || die "TPU_NAME is empty"
  [[ -n "$ZONE" ]] || die "ZONE is not set (export ZONE=... or gcloud config set compute/zone ...)"
  [[ -n "$PROJECT" ]] || die "PROJECT is not set (export PROJECT=... or gcloud config set project ...)"
  if [[ -z "$RUNTIME_VERSION" ]]; then
    RUNTIME_VERSION="$(default_runtime_version "$ACCELERATOR_TYPE")" \
      || die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=$ACCELERATOR_TYPE; set RUNTIME_VERSION"
  fi
  [[ "$RUN_NAME" =~ ^[A-Za-z0-9._-]+$ ]] \
    || die "RUN_NAME='$RUN_NAME': use letters, digits, '.', '_' and '-' only"
}

# Run gcloud, or print the command (shell-quoted) when DRY_RUN=1.
run_gcloud() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ gcloud'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  gcloud "$@"
}

# Run a shell command on every worker of the slice, concurrently.
tpu_ssh_all() {
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --worker=all --command "$1"
}

# Run a shell command on one worker (0-based index).
tpu_ssh_worker() {
  run_gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --worker="$1" --command "$2"
}

# Copy local files to the same path on every worker: tpu_scp_to_all SRC... DEST
tpu_scp_to_all() {
  local dest="${*: -1}"
  local srcs=("${@:1:$#-1}")
  run_gcloud compute tpus tpu-vm scp "${srcs[@]}" "$TPU_NAME:$dest" --zone "$ZONE" \
    --project "$PROJECT" --worker=all
}

# Copy a file from one worker to a local path: tpu_scp_from WORKER REMOTE LOCAL
tpu_scp_from() {
  run_gcloud compute tpus tpu-vm scp "$TPU_NAME:$2" "$3" --zone "$ZONE" --project "$PROJECT" \
    --worker="$1"
}

# Number of hosts of the slice: NUM_WORKERS, else one per network endpoint of the TPU node.
num_workers() {
  if [[ -n "$NUM_WORKERS" ]]; then
    echo "$NUM_WORKERS"
    return 0
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    die "NUM_WORKERS is not set (needed in DRY_RUN mode, where gcloud is not asked)"
  fi
  local ips
  ips="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" \
    --format='value(networkEndpoints[].ipAddress)')" || die "cannot describe TPU $TPU_NAME"
  local n
  n="$(tr -s ';,' '\n' <<<"$ips" | grep -c . || true)"
  [[ "$n" -ge 1 ]] || die "TPU $TPU_NAME reports no network endpoints (is it READY?)"
  NUM_WORKERS="$n"
  echo "$n"
}

# Shell-quote arguments into one string for a remote command line.
quote_args() {
  local out="" a
  for a in "$@"; do
    out+="$(printf '%q' "$a") "
  done
  printf '%s' "${out% }"
}

# One line about an exit status of rlhf-jax.
describe_exit_status() {
  case "$1" in
    "$EXIT_OK") echo "finished" ;;
    "$EXIT_PREEMPTED") echo "preempted: checkpoint saved; launch again to resume" ;;
    "$EXIT_NON_FINITE") echo "non-finite loss, gradient norm or state; the newest checkpoint is finite" ;;
    "$EXIT_STALLED") echo "training stalled (loss unchanged, gradient norm 0)" ;;
    130) echo "interrupted" ;;
    137) echo "killed (SIGKILL)" ;;
    *) echo "failed" ;;
  esac
}

# run_with_resubmit MAX CMD [ARG...]: run CMD ARG...; while it exits with EXIT_PREEMPTED (a
# training loop got SIGTERM and saved its checkpoint), run `CMD ARG... --resume` again, at
# most MAX more times. SIGTERM or SIGINT sent to this shell (stop.sh) is passed on to CMD and
# ends the loop once CMD has exited: a stopped run is not resubmitted. Where util-linux's
# `setpriv --pdeathsig` exists, CMD is killed when this shell dies (stop.sh --kill).
# Returns CMD's last exit status.
run_with_resubmit() {
  local max="$1"
  shift
  local attempt=0 rc=0 stop=0 child=""
  local -a pre=()
  if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
    pre=(setpriv --pdeathsig KILL --)
  fi
  trap 'stop=1; if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi' TERM INT
  while :; do
    if [ "$attempt" -eq 0 ]; then
      ${pre[@]+"${pre[@]}"} "$@" &
    else
      echo "=== $(date -u +%FT%TZ) $(hostname): exit status $EXIT_PREEMPTED (preempted), \
resubmitting with --resume ($attempt of $max)"
      ${pre[@]+"${pre[@]}"} "$@" --resume &
    fi
    child=$!
    while :; do  # a trapped signal interrupts `wait`: wait again until the child is gone
      rc=0
      wait "$child" || rc=$?
      kill -0 "$child" 2>/dev/null || break
    done
    child=""
    if [ "$rc" -ne "$EXIT_PREEMPTED" ] || [ "$stop" = 1 ]; then
      break
    fi
    if [ "$attempt" -ge "$max" ]; then
      echo "=== $(date -u +%FT%TZ) $(hostname): still preempted after $max resubmission(s); giving up"
      break
    fi
    attempt=$((attempt + 1))
  done
  trap - TERM INT
  return "$rc"
}
