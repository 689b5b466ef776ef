#!/usr/bin/env bash
# Start the same `rlhf-jax` command on every worker of the slice, in the background.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu_scripts/launch.sh [--preset NAME] [--command CMD] [--fsdp N] [--tensor M]
                             [--data D] [--max-resubmits K] [--sweep NAME] [--index I]
                             [-h] [-- OVERRIDES...]

Run, on every worker of \$TPU_NAME at once and detached from the ssh session (nohup):

  cd ~/\$REMOTE_DIR && .venv/bin/rlhf-jax CMD --preset NAME [--sweep S] [--index I] \\
      --name \$RUN_NAME [--mesh.fsdp N] [--mesh.tensor M] [--mesh.data D] OVERRIDES... \\
      --out-dir \$OUT_DIR

under a small supervisor script (~/rlhf_runs/\$RUN_NAME.sh) that runs the command again with
--resume, up to K times, while it exits with status 75 (EXIT_PREEMPTED: a training loop got
SIGTERM and saved its checkpoint). Stdout and stderr go to ~/rlhf_runs/\$RUN_NAME.log, the
supervisor's process id to ~/rlhf_runs/\$RUN_NAME.pid on each worker (stop.sh and logs.sh
read them). stop.sh's SIGTERM reaches the command through the supervisor, which then does
not resubmit. Exit statuses: 0 finished, 75 preempted, 76 NaN/Inf, 77 stalled (README).

Multi-host: every process calls rlhf_jax.sharding.initialize_distributed() before its first
JAX computation (rlhf_jax.cli does it for the pipeline and stage commands). On a Cloud TPU
VM slice this script exports RLHF_JAX_NUM_PROCESSES=<number of workers>, and JAX
auto-detects the coordinator (worker 0) and each worker's process id from the TPU metadata.
The mesh (data x fsdp x tensor) spans all chips of all workers; data=-1 (the default)
takes what fsdp x tensor leave. Batch sizes must divide by data x fsdp.

options:
  --preset NAME   rlhf_jax preset (default: smollm2-sentiment; see experiments/README.md)
  --command CMD   pipeline (default), one stage (sft, rm, ppo, dpo, eval) or sweep
  --fsdp N        --mesh.fsdp N   (shard parameters and optimizer state over N devices)
  --tensor M      --mesh.tensor M (tensor parallelism; must divide heads, kv heads, MLP)
  --data D        --mesh.data D   (default -1: all remaining devices)
  --max-resubmits K  resubmissions after exit status 75 (default \$MAX_RESUBMITS or 3; 0: none)
  --sweep NAME    run the named sweep (rlhf_jax.sweeps): CMD becomes sweep, and --preset is
                  passed only when given (it replaces the sweep's base preset)
  --index I       sweep only: run point I of the sweep (rlhf-jax sweep --index I), e.g. one
                  slice per point; repeatable. Give every such job the same OUT_DIR on
                  shared storage (stage outputs are shared) and its own RUN_NAME. Ad-hoc
                  grids go after --: --command sweep -- --grid PATH=V1,V2 --seeds 3
  -h, --help      this text (runs nothing)
  -- ...          any further pipeline overrides, passed unchanged, e.g.
                  -- --ppo.iterations 200 --policy.dtype bfloat16

environment: TPU_NAME ZONE PROJECT REMOTE_DIR RUN_NAME (default rlhf-run)
  OUT_DIR       output directory on the workers (default ~/rlhf_runs/\$RUN_NAME/out on each
                worker's local disk). Multi-host slices need a directory that every worker
                sees at the same path (a Cloud Storage bucket mounted with gcsfuse, a
                Filestore/NFS share): orbax checkpoints are written by all hosts together.
                Local disks also vanish with a preempted or deleted TPU VM.
  ALLOW_LOCAL_OUT=1  launch on several workers without OUT_DIR anyway
  NUM_WORKERS   number of hosts (default: asked from gcloud)
  LAUNCH_ENV    extra "NAME=value ..." exported before the command on every worker
                (e.g. LAUNCH_ENV="XLA_FLAGS=--xla_dump_to=/tmp/xla"); never put secrets here
  DRY_RUN=1     print the gcloud commands instead of running them

Re-launching with the same RUN_NAME and OUT_DIR resumes: finished stages are skipped and the
current stage continues from its last checkpoint (the pipeline's --resume is on by default).
EOF
}

preset="" command="pipeline" max_resubmits="$MAX_RESUBMITS"
mesh=()
overrides=()
sweep_args=()
named_sweep=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --preset) [[ $# -ge 2 ]] || die "--preset needs a name"; preset="$2"; shift ;;
    --command) [[ $# -ge 2 ]] || die "--command needs a value"; command="$2"; shift ;;
    --fsdp) [[ $# -ge 2 ]] || die "--fsdp needs a number"; mesh+=(--mesh.fsdp "$2"); shift ;;
    --tensor) [[ $# -ge 2 ]] || die "--tensor needs a number"; mesh+=(--mesh.tensor "$2"); shift ;;
    --data) [[ $# -ge 2 ]] || die "--data needs a number"; mesh+=(--mesh.data "$2"); shift ;;
    --max-resubmits) [[ $# -ge 2 ]] || die "--max-resubmits needs a number"; max_resubmits="$2"; shift ;;
    --sweep) [[ $# -ge 2 ]] || die "--sweep needs a name"; command="sweep"; named_sweep="$2"; shift ;;
    --index)
      [[ $# -ge 2 ]] || die "--index needs a number"
      [[ "$2" =~ ^[0-9]+$ ]] || die "--index must be a number, got '$2'"
      sweep_args+=(--index "$2"); shift ;;
    --) shift; overrides=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1' (pipeline overrides go after --)" ;;
  esac
  shift
done
case "$command" in
  pipeline|sft|rm|ppo|dpo|eval|sweep) ;;
  *) die "--command must be pipeline, sft, rm, ppo, dpo, eval or sweep, got '$command'" ;;
esac
if [[ ${#sweep_args[@]} -gt 0 && "$command" != sweep ]]; then
  die "--index applies to --command sweep only (got --command $command)"
fi
if [[ -n "$named_sweep" ]]; then
  sweep_args=(--sweep "$named_sweep" ${sweep_args[@]+"${sweep_args[@]}"})
fi
preset_args=()
if [[ -z "$preset" && -z "$named_sweep" ]]; then
  preset="smollm2-sentiment"  # a named sweep brings its own preset
fi
if [[ -n "$preset" ]]; then
  preset_args=(--preset "$preset")
fi
[[ "$max_resubmits" =~ ^[0-9]+$ ]] || die "--max-resubmits must be a number, got '$max_resubmits'"

resolve_config
workers="$(num_workers)"
if [[ "$workers" -gt 1 && -z "$OUT_DIR" && "${ALLOW_LOCAL_OUT:-0}" != 1 ]]; then
  die "the slice has $workers workers: set OUT_DIR to a directory every worker shares \
(gcsfuse bucket mount, NFS), or ALLOW_LOCAL_OUT=1 to use local disks anyway (see README)"
fi

runs="$REMOTE_RUNS_DIR"
log_file="$runs/$RUN_NAME.log" pid_file="$runs/$RUN_NAME.pid" out_file="$runs/$RUN_NAME.outdir"
script_file="$runs/$RUN_NAME.sh"
if [[ -n "$OUT_DIR" ]]; then
  out_expr="$(printf '%q' "$OUT_DIR")"
else
  out_expr="\$HOME/$runs/$RUN_NAME/out"
fi

env_exports=""
if [[ "$workers" -gt 1 ]]; then
  env_exports+="export RLHF_JAX_NUM_PROCESSES=$workers; "
fi
if [[ -n "${LAUNCH_ENV:-}" ]]; then
  read -r -a launch_env <<<"$LAUNCH_ENV"
  for kv in "${launch_env[@]}"; do
    [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "LAUNCH_ENV entry '$kv' is not NAME=value"
    env_exports+="export $(printf '%q' "$kv"); "
  done
fi

cli_args="$(quote_args "$command" ${preset_args[@]+"${preset_args[@]}"} \
  ${sweep_args[@]+"${sweep_args[@]}"} --name "$RUN_NAME" \
  ${mesh[@]+"${mesh[@]}"} ${overrides[@]+"${overrides[@]}"})"
rdir="$(printf '%q' "$REMOTE_DIR")"

# The supervisor each worker runs: the helpers of common.sh it needs, then the command.
read -r -d '' supervisor <<EOF || true
#!/usr/bin/env bash
# Written by tpu_scripts/launch.sh: run $RUN_NAME, again with --resume after exit status $EXIT_PREEMPTED.
EXIT_OK=$EXIT_OK EXIT_PREEMPTED=$EXIT_PREEMPTED EXIT_NON_FINITE=$EXIT_NON_FINITE EXIT_STALLED=$EXIT_STALLED
$(declare -f describe_exit_status run_with_resubmit)
cd "\$HOME" && cd $rdir
OUT=$out_expr
${env_exports}
echo "=== \$(date -u +%FT%TZ) \$(hostname): rlhf-jax $cli_args --out-dir \$OUT"
rc=0
run_with_resubmit $max_resubmits .venv/bin/rlhf-jax $cli_args --out-dir "\$OUT" || rc=\$?
echo "=== \$(date -u +%FT%TZ) \$(hostname): rlhf-jax exited with status \$rc (\$(describe_exit_status "\$rc"))"
exit "\$rc"
EOF

read -r -d '' remote <<EOF || true
set -e
mkdir -p ~/$runs
if [ -f ~/$pid_file ] && kill -0 "\$(cat ~/$pid_file)" 2>/dev/null; then
  echo "\$(hostname): run $RUN_NAME is already running (pid \$(cat ~/$pid_file)); stop it first" >&2
  exit 1
fi
cd $rdir
OUT=$out_expr
mkdir -p "\$OUT"
echo "\$OUT" > ~/$out_file
cat > ~/$script_file <<'RLHF_JAX_SUPERVISOR'
$supervisor
RLHF_JAX_SUPERVISOR
nohup setsid bash ~/$script_file >> ~/$log_file 2>&1 < /dev/null &
echo \$! > ~/$pid_file
echo "\$(hostname): started $RUN_NAME (pid \$!), log ~/$log_file"
EOF

log "launching '$command ${preset_args[*]-} ${sweep_args[*]-}' as $RUN_NAME on $workers worker(s) of $TPU_NAME"
tpu_ssh_all "$remote"
log "follow with: RUN_NAME=$RUN_NAME tpu_scripts/logs.sh -f"
