#!/usr/bin/env bash
# Estimate the memory per rank of a training run without GPUs (`lathe estimate`, on fake tensors).
# torchtitan's variables:
#   NGPU          GPUs per node of the job to size (default 8)
#   NNODES        nodes (default 1); the world size is NGPU x NNODES
#   CONFIG_FILE   TOML config (default: configs/debug_model.toml)
# Every argument is forwarded as an override or an estimate option, e.g.
#   NGPU=8 CONFIG_FILE=configs/llama3_8b.toml ./scripts/run_memory_estimation.sh --device H100
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NGPU=${NGPU:-8}
NNODES=${NNODES:-1}
CONFIG_FILE=${CONFIG_FILE:-"$here/../configs/debug_model.toml"}
# Works from a checkout without `pip install -e .` too.
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"

exec python -m lathe estimate --config "$CONFIG_FILE" --world-size $((NGPU * NNODES)) "$@"
