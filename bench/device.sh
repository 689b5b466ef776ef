#!/usr/bin/env bash
# The bench set in bfloat16 on an accelerator (GPU or TPU), within a time budget (8 minutes by
# default, compiles included). See bench/README.md, "On an accelerator: bench/device.sh".
#
# Parts, in order, each in its own process under `timeout`:
#   1. rates    python -m bench.devices: the data-sheet peak of the chip and the measured bf16
#               matmul (8192^3) and device copy (2 GiB) rates
#   2. sft      python -m bench.train_steps --steps sft --dtype bfloat16 on workload_device.json
#   3. rm       the same, --steps rm
#   4. dpo      the same, --steps dpo
#   5. sampler  python -m bench.sampler --dtypes bfloat16 on workload_device.json (scanned and
#               unrolled decode loops)
#   6. main_job python -m bench.main_job: `rlhf-jax pipeline` (default preset) timed, only when
#               its inputs are in the cache (RLHF_JAX_CACHE); else one line saying why not
# Every JSON line goes to $OUT/device-<date>.jsonl if $OUT is set, else bench/results/ (git-
# ignored); the other output to a .log beside it. A summary table ends the run.
#
# Measured on one H200 (2026-11-29): 119-133 s in all before the main job (rates 7-9 s, each
# train step 24-29 s of which 9-13 s compile, sampler 30-31 s); an H100 should take about the
# same. The main job gets what is left of the budget (~5.5 minutes).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash bench/device.sh [options]

Runs the bench set in bfloat16 on the accelerator JAX finds (GPU or TPU) within a time
budget: device peak and measured rates; bench.train_steps SFT, RM and DPO steps of the
1B-scale workload (bench/workload_device.json); bench.sampler on the same model; the main
job's wall time when its inputs are cached. Refuses to run on CPU unless --allow-cpu.

options:
  --allow-cpu            run on CPU too (a smoke test: the tiny 'small' workload of
                         bench/workload.json, few steps, main job skipped unless --main-job)
  --budget SECONDS       total time budget (default 480); each part's timeout is the smaller
                         of its own cap and what is left
  --peak-tflops X        peak dense bf16 TFLOP/s per chip (default: bench.devices.PEAKS)
  --hbm-gbs X            memory bandwidth GB/s per chip (default: bench.devices.PEAKS)
  --main-job             run the main job even with --allow-cpu
  --no-main-job          skip the main job
  --main-job-preset P    pipeline preset to time (default smollm2-sentiment)
  --output FILE          the JSON-lines file (default $OUT/device-<date>.jsonl, else
                         bench/results/device-<date>.jsonl)
  --python PY            interpreter (default $PYTHON, else .venv/bin/python, else python3)
  -h, --help             this text

environment: OUT (results folder), RLHF_JAX_CACHE (where the converted SmolLM2 is),
XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.92, so a 1B step fits an 80 GB GPU).
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALLOW_CPU=0
BUDGET=480
PEAK_ARGS=()
MAIN_JOB=auto
PRESET=smollm2-sentiment
OUTPUT=""
PY="${PYTHON:-}"

while [ $# -gt 0 ]; do
  case "$1" in
    --allow-cpu) ALLOW_CPU=1 ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --peak-tflops) PEAK_ARGS+=(--peak-tflops "${2:?--peak-tflops needs a number}"); shift ;;
    --hbm-gbs) PEAK_ARGS+=(--hbm-gbs "${2:?--hbm-gbs needs a number}"); shift ;;
    --main-job) MAIN_JOB=yes ;;
    --no-main-job) MAIN_JOB=no ;;
    --main-job-preset) PRESET="${2:?--main-job-preset needs a name}"; shift ;;
    --output) OUTPUT="${2:?--output needs a path}"; shift ;;
    --python) PY="${2:?--python needs a path}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in
  ''|*[!0-9]*) echo "device.sh: --budget must be whole seconds, got '$BUDGET'" >&2; exit 2 ;;
esac

cd "$ROOT"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"

START=$SECONDS
if ! PLATFORM="$("$PY" -c 'import jax; print(jax.devices()[0].platform)' 2>/dev/null | tail -n 1)"; then
  echo "device.sh: '$PY' cannot import jax or list its devices" >&2
  exit 1
fi
if [ "$PLATFORM" = cpu ] && [ "$ALLOW_CPU" != 1 ]; then
  echo "device.sh: JAX sees no accelerator here (platform 'cpu'): this script measures a GPU or" >&2
  echo "TPU (bf16 MFU at 1B scale). Run it on an accelerator machine, or pass --allow-cpu for a" >&2
  echo "smoke test on the tiny 'small' workload." >&2
  exit 1
fi

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
if [ -z "$OUTPUT" ]; then
  if [ -n "${OUT:-}" ]; then
    OUTPUT="$OUT/device-$STAMP.jsonl"
  else
    OUTPUT="$ROOT/bench/results/device-$STAMP.jsonl"
  fi
fi
mkdir -p "$(dirname "$OUTPUT")"
LOG="${OUTPUT%.jsonl}.log"
: >"$OUTPUT"
: >"$LOG"

if [ "$PLATFORM" = cpu ]; then
  # smoke test: the tiny workload, few steps, small rates
  TRAIN=(--workload small --warmup-steps 1 --timed-steps 3 --dtype bfloat16)
  SAMPLER=(--model small --dtypes bfloat16 --unroll "off,on" --no-hf --warmup 0 --iters 2
           --matmul-precision default)
  RATES=(--matmul-n 1024 --copy-mib 64 --iters 5)
  [ "$MAIN_JOB" = auto ] && MAIN_JOB=no-cpu
else
  TRAIN=(--workload-file bench/workload_device.json --workload all --dtype bfloat16
         --matmul-n 8192)
  SAMPLER=(--workload-file bench/workload_device.json --model all --dtypes bfloat16
           --unroll "off,on" --no-hf --warmup 1 --iters 5 --matmul-precision default)
  RATES=()
fi

# One JSON line of this script's own (bench: device_sh_*), with the same time stamp format.
note() {
  "$PY" - "$@" >>"$OUTPUT" <<'EOF'
import datetime, json, sys
rec = {"bench": sys.argv[1]}
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    try:
        v = json.loads(v)
    except ValueError:
        pass
    rec[k] = v
rec["time_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
print(json.dumps(rec))
EOF
}

# run_part NAME CAP_SECONDS CMD...: run CMD under timeout (the smaller of CAP and what is left
# of the budget), its JSON lines (stdout lines starting with '{') to $OUTPUT, everything else
# to $LOG, and one status line.
run_part() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 5))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "[device.sh] $name: skipped, ${left}s left of the ${BUDGET}s budget" >&2
    note device_sh_part "part=$name" status=skipped "reason=no time left in the budget"
    return 0
  fi
  local t0=$SECONDS rc=0 tmp
  tmp="$(mktemp)"
  echo "[device.sh] $name: timeout ${limit}s: $*" >&2
  {
    echo "=== $name: $*"
  } >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >"$tmp" 2>>"$LOG" || rc=$?
  grep '^{' "$tmp" >>"$OUTPUT" || true
  grep -v '^{' "$tmp" >>"$LOG" || true
  rm -f "$tmp"
  local status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    status=timed_out
  elif [ "$rc" != 0 ]; then
    status=failed
  fi
  local took=$((SECONDS - t0))
  echo "[device.sh] $name: $status (rc $rc) in ${took}s" >&2
  note device_sh_part "part=$name" "status=$status" "rc=$rc" "seconds=$took" "timeout_s=$limit"
  if [ "$status" != ok ]; then
    echo "[device.sh] $name: last lines of its output ($LOG):" >&2
    tail -n 5 "$LOG" >&2 || true
  fi
}

note device_sh_start "platform=$PLATFORM" "budget_s=$BUDGET" "python=$PY" \
  "xla_mem_fraction=$XLA_PYTHON_CLIENT_MEM_FRACTION" "output=$OUTPUT"

run_part rates 45 "$PY" -m bench.devices ${PEAK_ARGS[@]+"${PEAK_ARGS[@]}"} ${RATES[@]+"${RATES[@]}"}
run_part sft 110 "$PY" -m bench.train_steps --steps sft "${TRAIN[@]}" ${PEAK_ARGS[@]+"${PEAK_ARGS[@]}"}
run_part rm 100 "$PY" -m bench.train_steps --steps rm "${TRAIN[@]}" ${PEAK_ARGS[@]+"${PEAK_ARGS[@]}"}
run_part dpo 120 "$PY" -m bench.train_steps --steps dpo "${TRAIN[@]}" ${PEAK_ARGS[@]+"${PEAK_ARGS[@]}"}
run_part sampler 150 "$PY" -m bench.sampler "${SAMPLER[@]}" ${PEAK_ARGS[@]+"${PEAK_ARGS[@]}"}

case "$MAIN_JOB" in
  no)
    note main_job "preset=$PRESET" skipped=true "reason=--no-main-job" ;;
  no-cpu)
    note main_job "preset=$PRESET" skipped=true \
      "reason=--allow-cpu smoke run: the main job takes ~22 min on a 2-core CPU (--main-job runs it)" ;;
  *)
    # the pipeline gets what is left, less 30 s for start-up, its kill and the line; its own
    # timeout inside (bench.main_job kills the pipeline's process group), run_part's outside
    left=$((BUDGET - (SECONDS - START) - 30))
    if [ "$left" -lt 60 ]; then
      note main_job "preset=$PRESET" skipped=true \
        "reason=only ${left}s left of the ${BUDGET}s budget (needs >= 60)"
    else
      run_part main_job $((left + 30)) "$PY" -m bench.main_job --preset "$PRESET" \
        --timeout "$left" --log "${LOG%.log}.main_job.log"
    fi ;;
esac

echo "[device.sh] done in $((SECONDS - START))s: $OUTPUT" >&2

# The summary table.
"$PY" - "$OUTPUT" <<'EOF'
import json, sys

lines = []
for raw in open(sys.argv[1]):
    try:
        lines.append(json.loads(raw))
    except ValueError:
        pass


def f(x, fmt="{:.3g}"):
    return "-" if x is None else fmt.format(x)


print()
print(f"results: {sys.argv[1]}")
parts = [r for r in lines if r["bench"] == "device_sh_part"]
print("parts: " + ", ".join(f"{r['part']} {r['status']}"
                            + (f" {r['seconds']}s" if "seconds" in r else "") for r in parts))
for r in lines:
    if r["bench"] == "device_peak" and r.get("peak_name") is None:
        print(f"device: {r.get('device_kind')} (no data-sheet peak: no mfu / frac_hbm)")
    elif r["bench"] == "device_peak":
        print(f"device: {r.get('device_kind')} -> {r.get('peak_name')}: "
              f"{r.get('peak_bf16_tflops')} TFLOP/s, {r.get('peak_hbm_gb_s')} GB/s")
    elif r["bench"] == "device_matmul":
        print(f"measured bf16 matmul {r['matmul_n']}^3: {r['matmul_tflops_pipelined']:.1f} TFLOP/s"
              f" ({f(r.get('frac_of_peak'), '{:.0%}')} of peak)")
    elif r["bench"] == "device_copy":
        print(f"measured copy {r['copy_mib']:.0f} MiB: {r['copy_gb_s_pipelined']:.0f} GB/s"
              f" ({f(r.get('frac_of_peak'), '{:.0%}')} of peak)")
print()
print(f"{'step':<10} {'workload':<13} {'seqs':>4} {'seq':>5} {'step_s':>8} {'TFLOP/s':>8} "
      f"{'mfu':>6} {'frac_mm':>7} {'mem_GB':>7}  target")
for r in lines:
    if r["bench"] in ("sft_step", "rm_step", "dpo_step"):
        tflops = r["gflops"] / 1e3
        print(f"{r['bench']:<10} {r['workload']:<13} {r.get('sequences', r['batch']):>4} "
              f"{r['seq']:>5} {r['step_s']:>8.4f} {tflops:>8.2f} {f(r.get('mfu'), '{:.1%}'):>6} "
              f"{r['frac_of_peak']:>7.2f} {f(r.get('device_peak_mem_gb'), '{:.1f}'):>7}  "
              "mfu >= 45% (1B, H100/H200)")
print()
print(f"{'sampler':<22} {'B':>3} {'P+R':>8} {'decode_ms':>9} {'bound_ms':>8} "
      f"{'frac_hbm':>8} {'frac_copy':>9} {'tok/s':>9}  target")
for r in lines:
    if r["bench"] == "sampler" and r.get("impl") == "rlhf_jax":
        form = "unrolled" if r.get("unroll_layers") else "scanned"
        short = {"bfloat16": "bf16", "float32": "fp32"}.get(r["dtype"], r["dtype"])
        name = f"{r['model']} {short} {form}"
        bound = r.get("hbm_bound_ms_per_step")
        frac_copy = r.get("frac_of_device_copy_bound", r.get("frac_of_bound"))
        print(f"{name:<22} {r['batch']:>3} {r['prompt_len']:>4}+{r['new_tokens']:<3} "
              f"{r['decode_ms_per_step']:>9.3f} {f(bound, '{:.3f}'):>8} "
              f"{f(r.get('frac_of_hbm_bound'), '{:.1%}'):>8} {f(frac_copy, '{:.1%}'):>9} "
              f"{r['new_tokens_per_s']:>9.0f}  frac_hbm >= 60%")
print()
for r in lines:
    if r["bench"] == "main_job":
        if r.get("skipped"):
            print(f"main job ({r.get('preset')}): skipped: {r.get('reason')}")
        else:
            print(f"main job ({r.get('preset')}): {r['main_job_s']:.0f} s, rc {r['rc']}"
                  + (" (timed out)" if r.get("timed_out") else ""))
EOF
