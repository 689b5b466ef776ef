#!/usr/bin/env bash
# Show or fetch the logs (and results) of a run started by launch.sh.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu_scripts/logs.sh [-n LINES] [-f] [--worker W] [--fetch DIR] [--results DIR] [-h]

Logs of run \$RUN_NAME (~/rlhf_runs/\$RUN_NAME.log on each worker).

  (default)      last LINES lines of the log of every worker, each line prefixed with the
                 worker's host name, plus whether the run's process is alive
  -n LINES       lines to show (default 40)
  -f             follow the log (tail -f) of one worker (--worker, default 0); Ctrl-C stops
                 following, not the run
  --worker W     worker index for -f (default 0)
  --fetch DIR    copy every worker's log to DIR/\$RUN_NAME.worker<i>.log (scp)
  --results DIR  copy the run's outputs without checkpoints or weights (metrics.jsonl,
                 report, plots, config, summary.json: what process 0 writes) from worker 0
                 to DIR/\$RUN_NAME-results.tar.gz
  -h, --help     this text (runs nothing)

environment: TPU_NAME ZONE PROJECT RUN_NAME NUM_WORKERS DRY_RUN=1
EOF
}

lines=40 follow=0 worker=0 fetch="" results=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    -n) [[ $# -ge 2 ]] || die "-n needs a number"; lines="$2"; shift ;;
    -f) follow=1 ;;
    --worker) [[ $# -ge 2 ]] || die "--worker needs an index"; worker="$2"; shift ;;
    --fetch) [[ $# -ge 2 ]] || die "--fetch needs a directory"; fetch="$2"; shift ;;
    --results) [[ $# -ge 2 ]] || die "--results needs a directory"; results="$2"; shift ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done
[[ "$lines" =~ ^[0-9]+$ ]] || die "-n must be a number, got '$lines'"
[[ "$worker" =~ ^[0-9]+$ ]] || die "--worker must be an index, got '$worker'"

resolve_config
runs="$REMOTE_RUNS_DIR"
log_file="$runs/$RUN_NAME.log" pid_file="$runs/$RUN_NAME.pid" out_file="$runs/$RUN_NAME.outdir"

if [[ -n "$fetch" ]]; then
  mkdir -p "$fetch"
  n="$(num_workers)"
  for ((i = 0; i < n; i++)); do
    tpu_scp_from "$i" "$log_file" "$fetch/$RUN_NAME.worker$i.log"
  done
  log "logs in $fetch"
elif [[ -n "$results" ]]; then
  mkdir -p "$results"
  tarball="/tmp/$RUN_NAME-results.tar.gz"
  tpu_ssh_worker 0 "set -e; OUT=\$(cat ~/$out_file); tar -czf $tarball -C \"\$OUT\" \
--exclude=checkpoints --exclude=final --exclude=hf ."
  tpu_scp_from 0 "$tarball" "$results/$RUN_NAME-results.tar.gz"
  log "results in $results/$RUN_NAME-results.tar.gz"
elif [[ "$follow" == 1 ]]; then
  tpu_ssh_worker "$worker" "tail -n $lines -F ~/$log_file"
else
  tpu_ssh_all "h=\$(hostname); if [ -f ~/$pid_file ] && kill -0 \"\$(cat ~/$pid_file)\" 2>/dev/null; \
then echo \"[\$h] $RUN_NAME: running (pid \$(cat ~/$pid_file))\"; else echo \"[\$h] $RUN_NAME: not running\"; fi; \
tail -n $lines ~/$log_file 2>/dev/null | tr '\r' '\n' | tail -n $lines | awk -v h=\"\$h\" '{print \"[\" h \"] \" \$0}'"
fi
