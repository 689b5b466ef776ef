#!/usr/bin/env bash
# Delete the TPU slice (or its queued resource). Everything on the workers' disks is lost.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu_scripts/delete.sh [--queued] [-y] [-h]

Delete the TPU slice \$TPU_NAME in \$ZONE / \$PROJECT. The workers' local disks go with it:
stop the run first (stop.sh --wait) and keep outputs on shared storage (OUT_DIR) or fetch
them (logs.sh --fetch / --results).

options:
  --queued    delete the queued resource \$QUEUED_RESOURCE (default \$TPU_NAME-qr) and
              its node (gcloud compute tpus queued-resources delete --force)
  -y, --yes   do not ask for confirmation
  -h, --help  this text (runs nothing)

environment: TPU_NAME ZONE PROJECT [QUEUED_RESOURCE] DRY_RUN=1
EOF
}

queued=0 yes=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --queued) queued=1 ;;
    -y|--yes) yes=1 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done

resolve_config
QUEUED_RESOURCE="${QUEUED_RESOURCE:-$TPU_NAME-qr}"
target="TPU $TPU_NAME"
[[ "$queued" == 1 ]] && target="queued resource $QUEUED_RESOURCE (and node $TPU_NAME)"
if [[ "$yes" != 1 && "$DRY_RUN" != 1 ]]; then
  read -r -p "delete $target in $ZONE ($PROJECT)? [y/N] " answer
  [[ "$answer" == y || "$answer" == Y ]] || die "not deleted"
fi

if [[ "$queued" == 1 ]]; then
  run_gcloud compute tpus queued-resources delete "$QUEUED_RESOURCE" --zone "$ZONE" \
    --project "$PROJECT" --force --quiet
else
  run_gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --quiet
fi
log "deleted $target"
