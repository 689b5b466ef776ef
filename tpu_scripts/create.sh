#!/usr/bin/env bash
# Create a Cloud TPU VM slice (directly, or through a queued resource).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu_scripts/create.sh [--spot] [--queued] [--wait] [-h] [-- EXTRA_GCLOUD_FLAGS...]

Create the TPU slice \$TPU_NAME of type \$ACCELERATOR_TYPE in \$ZONE / \$PROJECT with
software version \$RUNTIME_VERSION (default derived from the accelerator type).

options:
  --spot      a Spot TPU (much cheaper; can be preempted at any time: see README,
              "Preemption"; keep OUT_DIR on shared storage)
  --queued    create through a queued resource (gcloud compute tpus queued-resources):
              the request waits until capacity is available; the queued resource is
              called \$QUEUED_RESOURCE (default: \$TPU_NAME-qr) and the node \$TPU_NAME
  --wait      with --queued: poll until the queued resource is ACTIVE
  -h, --help  this text (runs nothing)
  -- ...      further flags passed to gcloud unchanged (e.g. --network, --subnetwork,
              --internal-ips, --reserved, --labels)

environment: TPU_NAME ZONE PROJECT ACCELERATOR_TYPE RUNTIME_VERSION [QUEUED_RESOURCE]
             DRY_RUN=1 prints the gcloud commands instead of running them.

example:
  TPU_NAME=rlhf ZONE=us-west4-a PROJECT=my-project ACCELERATOR_TYPE=v5litepod-16 \\
    tpu_scripts/create.sh --spot
EOF
}

spot=0 queued=0 wait=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --wait) wait=1 ;;
    --) shift; extra=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done

resolve_config
QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME-qr}"
flags=(--zone "$ZONE" --project "$PROJECT" --accelerator-type "$ACCELERATOR_TYPE")
[[ "$spot" == 1 ]] && flags+=(--spot)

if [[ "$queued" == 1 ]]; then
  log "requesting $ACCELERATOR_TYPE as queued resource $QUEUED_RESOURCE (node $TPU_NAME)"
  run_gcloud compute tpus queued-resources create "$QUEUED_RESOURCE" --node-id "$TPU_NAME" \
    --runtime-version "$RUNTIME_VERSION" "${flags[@]}" "${extra[@]}"
  if [[ "$wait" == 1 && "$DRY_RUN" != 1 ]]; then
    while true; do
      state="$(gcloud compute tpus queued-resources describe "$QUEUED_RESOURCE" --zone "$ZONE" \
        --project "$PROJECT" --format='value(state.state)')"
      log "queued resource $QUEUED_RESOURCE: $state"
      case "$state" in
        ACTIVE) break ;;
        FAILED|SUSPENDED) die "queued resource $QUEUED_RESOURCE is $state" ;;
      esac
      sleep 30
    done
  fi
else
  [[ "$wait" == 1 ]] && log "--wait only applies to --queued (tpu-vm create already waits)"
  log "creating $ACCELERATOR_TYPE slice $TPU_NAME ($RUNTIME_VERSION) in $ZONE"
  run_gcloud compute tpus tpu-vm create "$TPU_NAME" --version "$RUNTIME_VERSION" "${flags[@]}" \
    "${extra[@]}"
fi
log "next: tpu_scripts/install.sh"
