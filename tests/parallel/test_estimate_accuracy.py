"""``lathe estimate`` against real runs: for every eager layout of the parity suite, the fake-tensor
estimate of each rank's peak tensor memory is within 10% of what the real gloo run measured.

Quantity and tracker: the peak bytes of live tensor storages over the first two training steps,
counted by ``lathe.memtrack.MemoryTracker`` in both, the real run through the trainer's own
memory check (``lathe.memcheck``) and the estimate on fake tensors under a fake process group. All
layouts run in one torchrun job (``memory_worker.py``, 8 processes; each layout on the first N),
while this process computes the estimates (one rank per role). The analytic model is held to 15%
of the same runs. CI time: the tiny model with 2 blocks (4 where two stages share a pipeline rank),
32 tokens, the 2 steps the check needs, every layout in the one torchrun job.

Ranks holding the same stages run the same program, but gloo completes FSDP's asynchronous
collectives on its own threads, so a rank can keep a communication buffer alive a little longer
than another: measured peaks of identical ranks were seen to differ by up to 12% (FSDP x 4 with
full AC, on a loaded 2-core machine). So for each pipeline rank the closest of its ranks must be
within the tolerance, and every rank within twice it.

Left out: the ``torch.compile`` cases (the estimate is of the eager run; compiled blocks save
different tensors).
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lathe.config import load_config
from lathe.estimate import estimate
from lathe.memory_model import estimate_rank
from lathe.parallel.dims import ParallelDims

sys.path.insert(0, str(Path(__file__).parent))
from test_parity import LAYOUTS, local_batch  # noqa: E402

HERE = Path(__file__).parent
TOLERANCE = 0.10  # fake-mode estimate vs measured, per rank
ANALYTIC_TOLERANCE = 0.15  # analytic model vs measured, per rank
COMMON = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.steps", "2", "--metrics.log_freq", "1",
          "--training.mixed_precision_param", "float32", "--training.mixed_precision_reduce", "float32",
          "--comm.watchdog_timeout_seconds", "0", "--no-validation.enabled"]
# The eager layouts of the parity suite that differ in what they hold in memory: each data-parallel
# kind, AC modes, TP with and without FSDP, accumulation, and four pipeline schedules (all-forward
# GPipe, 1F1B, interleaved, V-shaped zero-bubble); the other parity layouts repeat these patterns.
KEPT = {"fsdp2", "fsdp4_ac_full", "hsdp2x2_ac_op", "ddp2", "tp2_ac_layer", "fsdp2xtp2", "fsdp2_accumulate2",
        "fsdp2xtp2_fused_ac_op", "pp2_GPipe", "pp2_1F1B", "pp2_Interleaved1F1B", "pp2_ZBVZeroBubble",
        "pp2xfsdp2_interleaved", "pp2xtp2_1f1b_ac_full"}
CASES = [(name, nproc, [o for o in overrides if o not in ("--validation.enabled",)])
         for name, nproc, _, overrides in LAYOUTS if name in KEPT]
assert len(CASES) == len(KEPT), "a kept layout was renamed in test_parity.py"
# the parity suite has PP x FSDP x TP only compiled; the eager 3-D layout is measured here, and
# context parallel (its parity tests are in test_context_parallel.py)
CASES = [("single", 1, []), *CASES,
         ("pp2xfsdp2xtp2", 8, ["--parallelism.pp", "2", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
         ("cp2xfsdp2", 4, ["--parallelism.cp", "2", "--parallelism.dp_shard", "2"])]


# Two blocks where the layout allows it (CI time): the interleaved and V-shaped schedules put two
# stages on each of the 2 pipeline ranks and keep the tiny model's 4.
FOUR_BLOCKS = {"pp2_Interleaved1F1B", "pp2_ZBVZeroBubble", "pp2xfsdp2_interleaved"}


def _config(name: str, overrides: list[str]) -> list[str]:
    blocks = [] if name in FOUR_BLOCKS else ["--model.n_layers", "2"]
    return [*COMMON, *blocks, "--training.batch_size", str(local_batch(name)), *overrides]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the real runs, estimate meanwhile; returns (measured, estimates, seconds)."""
    folder = tmp_path_factory.mktemp("memory")
    layouts = [[name, nproc, _config(name, overrides)] for name, nproc, overrides in CASES]
    (folder / "layouts.json").write_text(json.dumps(layouts))
    world = max(nproc for _, nproc, _ in CASES)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(HERE / "memory_worker.py"), str(folder / "layouts.json"), str(folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(folder / "worker.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        estimates, seconds = {}, {}
        for name, nproc, overrides in CASES:
            cfg, _ = load_config(_config(name, overrides))
            start = time.perf_counter()
            estimates[name] = estimate(cfg, nproc)
            seconds[name] = time.perf_counter() - start
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert code == 0, (folder / "worker.log").read_text()[-6000:]
    measured = {}
    for name, nproc, _ in CASES:
        measured[name] = {r: json.loads((folder / f"{name}_rank{r}.json").read_text()) for r in range(nproc)}
    return measured, estimates, seconds


def _assert_within(predicted_by_rank: dict[int, int], measured: dict[int, dict], tolerance: float, what: str):
    """``predicted_by_rank[r]``: the prediction for rank r. Per group of ranks with the same
    prediction (one pipeline rank), the closest within ``tolerance``, all within twice it."""
    groups: dict[int, list[int]] = {}
    for rank, predicted in predicted_by_rank.items():
        assert measured[rank]["measured"] > 0
        groups.setdefault(predicted, []).append(rank)
    for predicted, ranks in groups.items():
        errors = {r: abs(predicted / measured[r]["measured"] - 1) for r in ranks}
        detail = ", ".join(f"rank {r}: measured {measured[r]['measured']:,} B" for r in ranks)
        assert min(errors.values()) <= tolerance, f"{what} {predicted:,} B; {detail}"
        assert max(errors.values()) <= 2 * tolerance, f"{what} {predicted:,} B; {detail}"


@pytest.mark.parametrize("name,nproc,overrides", CASES, ids=[c[0] for c in CASES])
def test_fake_estimate_within_10_percent_of_real_run(runs, name, nproc, overrides):
    measured, estimates, _ = runs
    est = estimates[name]
    dims = ParallelDims.from_config(load_config(_config(name, overrides))[0].parallelism, nproc)
    # one rank measured per role (lathe.estimate.roles): its peak is the prediction for every rank of the role
    predicted = {member: r.peak for r in est.ranks for member in r.role.members(dims)}
    assert sorted(predicted) == sorted(measured[name])
    _assert_within(predicted, measured[name], TOLERANCE, "estimate")


@pytest.mark.parametrize("name,nproc,overrides", CASES, ids=[c[0] for c in CASES])
def test_analytic_model_within_15_percent_of_real_run(runs, name, nproc, overrides):
    measured, estimates, _ = runs
    cfg, _ = load_config(_config(name, overrides))
    dims = ParallelDims.from_config(cfg.parallelism, nproc)
    per_pp = nproc // dims.pp
    predicted = {}
    for rank, check in measured[name].items():
        model = estimate_rank(cfg, dims, estimates[name].vocab_size, rank // per_pp)
        assert check["predicted"] == model.peak  # the trainer's own check logged the same analytic number
        predicted[rank] = model.peak
    _assert_within(predicted, measured[name], ANALYTIC_TOLERANCE, "analytic")
