#!/usr/bin/env bash
# Run one shell command on every worker, inside the repository with its venv on PATH.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
usage: tpu_scripts/run_all.sh [-h] COMMAND

Run COMMAND (one string, a shell command line) on every worker of \$TPU_NAME at once, in
~/\$REMOTE_DIR with .venv/bin first on PATH, in the foreground. For preparing the workers,
e.g. putting a checkpoint at the same path on each of them:

  tpu_scripts/run_all.sh 'hf download openai-community/gpt2 config.json model.safetensors \\
      tokenizer.json tokenizer_config.json vocab.json merges.txt --local-dir checkpoints/gpt2'
  tpu_scripts/run_all.sh 'ls -l checkpoints/gpt2 && df -h .'

Long runs go through launch.sh (detached, logged, stoppable) instead.

environment: TPU_NAME ZONE PROJECT REMOTE_DIR DRY_RUN=1
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; die "no command given" ;;
esac
[[ $# -eq 1 ]] || die "give the command as one quoted string"

resolve_config
rdir="$(printf '%q' "$REMOTE_DIR")"
tpu_ssh_all "cd $rdir && export PATH=\"\$PWD/.venv/bin:\$PATH\" && $1"
