#!/usr/bin/env bash
# The main job: SmolLM2-135M-Instruct, SFT -> RM -> PPO and DPO on human sentiment ratings,
# judged by VADER (experiments/smollm2_sentiment.md). A thin wrapper over the CLI.
set -euo pipefail

usage() {
  cat <<EOF
usage: experiments/run_smollm2_sentiment.sh [-h] [OVERRIDES...]

Runs, from the repository root:

  \$PYTHON -m rlhf_jax.cli pipeline --preset smollm2-sentiment --out-dir \$OUT_DIR OVERRIDES...

  PYTHON   interpreter with rlhf_jax installed (default: .venv/bin/python if it exists,
           else python3; 'make install' creates .venv)
  OUT_DIR  output directory (default: runs/smollm2-sentiment); a finished stage is not run
           again, an interrupted one resumes from its last checkpoint

Any pipeline field can be overridden, e.g. --ppo.iterations 60 --seed 1;
'rlhf-jax pipeline --preset smollm2-sentiment --help' lists them all. The report is
\$OUT_DIR/report.md, the numbers \$OUT_DIR/summary.json.
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" -m rlhf_jax.cli pipeline --preset smollm2-sentiment \
  --out-dir "${OUT_DIR:-runs/smollm2-sentiment}" "$@"
