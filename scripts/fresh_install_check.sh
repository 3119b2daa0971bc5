#!/usr/bin/env bash
# A new user's first minutes, as CI runs them: the README's first command in a fresh virtual
# environment WITHOUT the dev extras (which would hide a missing dependency), then the commands a
# cluster user runs next. Every optional feature whose package is missing must stop in one line
# naming the extra (exit 2), never with a traceback.
#
#   scripts/fresh_install_check.sh        (from anywhere; uses a temporary folder, removed after)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
first='pip install "torch==2.13.0" -e . && lathe train'
if ! grep -qF "$first" "$repo/README.md"; then
  echo "fresh_install_check: the README's first command is no longer: $first (update this script with it)" >&2
  exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
step() { echo "fresh_install_check: $*" >&2; }

step "install as the README says (no extras)"
if ! (cd "$repo" && pip install -q --disable-pip-version-check "torch==2.13.0" -e .) >"$work/pip.txt" 2>&1; then
  cat "$work/pip.txt" >&2
  exit 1
fi
for dev_only in transformers datasets pyarrow matplotlib tensorboard wandb torchao pytest; do
  if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$dev_only') is None)"; then
    echo "fresh_install_check: $dev_only is installed without the extras; this check would hide its absence" >&2
    exit 1
  fi
done

cd "$work"
step "the main job (the debug model on the embedded corpus), a few steps, with a checkpoint"
lathe train --training.steps 3 --checkpoint.enable_checkpoint --checkpoint.interval 3 \
  --no-metrics.enable_color_printing
step "lathe data prepare, and a run on what it wrote"
lathe data prepare lathe_corpus --output "$work/prepared" --no-progress
lathe train --training.steps 2 --training.dataset_path "$work/prepared" --job.dump_folder "$work/on_prepared" \
  --no-metrics.enable_color_printing
step "lathe slurm"
lathe slurm --nodes 2 --gpus-per-node 0 --output "$work/job.sbatch" -- --training.steps 2
bash -n "$work/job.sbatch"
step "lathe convert (safetensors) and lathe estimate"
lathe convert lathe-to-hf "$work/outputs/checkpoint/step-3" "$work/hf"
test -f "$work/hf/model.safetensors" -o -f "$work/hf/model.safetensors.index.json"
lathe estimate --world-size 2 --parallelism.dp_shard 2 >/dev/null

step "optional features without their extra: one line naming it, exit 2"
expect_extra() {  # expect_extra EXTRA COMMAND...: exit 2 and a single line that names lathe[EXTRA]
  local extra=$1 rc=0
  shift
  "$@" >"$work/out.txt" 2>&1 || rc=$?
  local err
  err=$(grep -v ' INFO \| WARNING ' "$work/out.txt" || true)
  if [ "$rc" -ne 2 ] || ! grep -qF "lathe[$extra]" <<<"$err" || [ "$(wc -l <<<"$err")" -ne 1 ]; then
    echo "fresh_install_check: '$*' without lathe[$extra]: exit $rc, expected 2 and one line naming it:" >&2
    cat "$work/out.txt" >&2
    exit 1
  fi
}
expect_extra plot lathe plot "$work/outputs"
expect_extra tensorboard lathe train --training.steps 1 --metrics.enable_tensorboard
expect_extra wandb lathe train --training.steps 1 --metrics.enable_wandb
expect_extra float8 lathe train --training.steps 1 --float8.enable_float8_linear
expect_extra hf lathe train --training.steps 1 --training.dataset c4
step "passed"
