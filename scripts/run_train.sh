#!/usr/bin/env bash
# Launch `lathe train` on one machine through `lathe launch` (torchrun with clean exit codes:
# 0 done, 2 bad config (one line), 75 preempted after a checkpoint, 76 a rank hung).
#   NGPU          processes to start (default 8 on a CUDA machine, else 1); CPU runs use gloo
#   CONFIG_FILE   TOML config (default: configs/debug_model.toml)
#   LOG_RANK      comma-separated ranks whose output is shown (default 0)
#   MAX_RESTARTS  restart the workers after a failure this many times (default 0)
# Every argument is forwarded to the trainer as an override, e.g.
#   NGPU=1 ./scripts/run_train.sh --training.steps 20 --training.seq_len 256
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${NGPU:-}" ]; then
  NGPU=$(python -c "import torch; print(torch.cuda.device_count() or 1)")
fi
CONFIG_FILE=${CONFIG_FILE:-"$here/../configs/debug_model.toml"}
export LOG_RANK=${LOG_RANK:-0}  # torchrun shows these local ranks; lathe logs INFO on these ranks
MAX_RESTARTS=${MAX_RESTARTS:-0}
# Works from a checkout without `pip install -e .` too.
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"

exec python -m lathe launch --nproc-per-node="$NGPU" --rdzv-backend c10d --rdzv-endpoint="localhost:0" \
  --max-restarts "$MAX_RESTARTS" --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -- --config "$CONFIG_FILE" "$@"
