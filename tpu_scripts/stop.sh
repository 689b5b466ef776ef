#!/usr/bin/env bash
# Stop a run cleanly (SIGTERM: the training loop saves a checkpoint and exits), optionally
# wait for it and delete the slice.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu_scripts/stop.sh [--wait SECONDS] [--kill] [--delete] [-y] [-h]

Send SIGTERM to run \$RUN_NAME on every worker (the pid in ~/rlhf_runs/\$RUN_NAME.pid).
The training loop treats SIGTERM like a preemption notice: it finishes the current step,
saves a checkpoint of the stage and exits; launching again with the same RUN_NAME and
OUT_DIR resumes from there.

options:
  --wait SECONDS  wait up to SECONDS for the processes to exit (default 0: do not wait)
  --kill          after --wait, SIGKILL what is still running (loses the steps since the
                  last saved checkpoint)
  --delete        then delete the slice (tpu_scripts/delete.sh; asks unless -y)
  -y, --yes       do not ask before deleting
  -h, --help      this text (runs nothing)

environment: TPU_NAME ZONE PROJECT RUN_NAME DRY_RUN=1
EOF
}

wait_s=0 kill=0 delete=0 yes=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --wait) [[ $# -ge 2 ]] || die "--wait needs seconds"; wait_s="$2"; shift ;;
    --kill) kill=1 ;;
    --delete) delete=1 ;;
    -y|--yes) yes=1 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done
[[ "$wait_s" =~ ^[0-9]+$ ]] || die "--wait must be a number of seconds, got '$wait_s'"

resolve_config
pid_file="$REMOTE_RUNS_DIR/$RUN_NAME.pid"

read -r -d '' remote <<EOF || true
h=\$(hostname)
if [ ! -f ~/$pid_file ]; then echo "[\$h] no run $RUN_NAME here"; exit 0; fi
pid=\$(cat ~/$pid_file)
if ! kill -0 "\$pid" 2>/dev/null; then echo "[\$h] $RUN_NAME (pid \$pid) is not running"; exit 0; fi
kill -TERM "\$pid" && echo "[\$h] sent SIGTERM to $RUN_NAME (pid \$pid)"
waited=0
while [ \$waited -lt $wait_s ] && kill -0 "\$pid" 2>/dev/null; do sleep 5; waited=\$((waited + 5)); done
if kill -0 "\$pid" 2>/dev/null; then
  if [ $kill = 1 ] && [ $wait_s -gt 0 ]; then
    kill -KILL "\$pid" && echo "[\$h] $RUN_NAME still running after ${wait_s}s: sent SIGKILL"
  elif [ $wait_s -gt 0 ]; then
    echo "[\$h] $RUN_NAME still running after ${wait_s}s (saving?)"
  fi
else
  [ $wait_s -gt 0 ] && echo "[\$h] $RUN_NAME exited"
fi
exit 0
EOF

log "stopping $RUN_NAME on every worker of $TPU_NAME"
tpu_ssh_all "$remote"

if [[ "$delete" == 1 ]]; then
  args=()
  [[ "$yes" == 1 ]] && args+=(-y)
  "$TPU_SCRIPTS_DIR/delete.sh" ${args[@]+"${args[@]}"}
fi
