"""Unit tests for lathe.metrics and lathe.profiling (CPU only, a few seconds in total)."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

from lathe import metrics as M
from lathe.metrics import peak as P
from lathe import profiling
from lathe.profiling import maybe_memory_snapshot, maybe_profile

# The documented console shape, without colour codes.
CONSOLE_RE = re.compile(
    r"^step: +\d+  loss: +-?\d+\.\d{4}  memory: +\d+\.\d{2}GiB\(\d+\.\d{2}%\)  "
    r"wps: [\d,]+  mfu: \d+\.\d{2}%"
    r"(  \| tokens: [\d,]+  lr: \d\.\d{3}e[+-]\d{2}  gnorm: \d+\.\d{4}  "
    r"step_time: \d+\.\d{2}s  data: \d+\.\d%)?$"
)
ANSI_RE = re.compile(r"\033\[[0-9;]*m")


@pytest.fixture(scope="session")
def _shared_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lathe_cache")


_real_measure = P.measure_matmul_flops


@pytest.fixture(autouse=True)
def _isolated_cache(_shared_cache_dir, monkeypatch):
    """Never touch the real ~/.cache, and don't spend half a second benchmarking the CPU in every
    test that builds a MetricsProcessor: a fixed fake measurement stands in, except in the test of
    the measurement itself."""
    monkeypatch.setenv("LATHE_CACHE_DIR", str(_shared_cache_dir))
    monkeypatch.setattr(P, "measure_matmul_flops", lambda device, budget_s=0.5: (1e11, "fake"))


# --- console line ---------------------------------------------------------------------------------


def _line(color: bool, extras: bool = True) -> str:
    kw = dict(
        step=10, loss=7.1234, memory_gib=0.52, memory_pct=2.14, wps=1710.4, mfu=3.5, color=color
    )
    if extras:
        kw.update(
            tokens_seen=163840, lr=8e-4, grad_norm=1.2345, step_time=0.94, data_loading_pct=0.3
        )
    return M.format_console_line(**kw)


def test_console_line_plain_matches_documented_example():
    line = _line(color=False)
    assert line == (
        "step: 10  loss:  7.1234  memory:  0.52GiB(2.14%)  wps: 1,710  mfu: 3.50%  "
        "| tokens: 163,840  lr: 8.000e-04  gnorm: 1.2345  step_time: 0.94s  data: 0.3%"
    )
    assert CONSOLE_RE.match(line)
    assert CONSOLE_RE.match(_line(color=False, extras=False))
    assert "\033[" not in line


def test_console_line_color_has_same_text():
    line = _line(color=True)
    assert "\033[96mstep: 10\033[0m" in line  # cyan step
    assert "\033[95mmfu: 3.50%\033[0m" in line  # magenta mfu
    assert ANSI_RE.sub("", line) == _line(color=False)
    assert CONSOLE_RE.match(ANSI_RE.sub("", line))


# --- peak FLOPs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A40", 149.7e12),
        ("NVIDIA RTX A6000", 154.8e12),
        ("NVIDIA L40", 181e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2.25e15),
    ],
)
def test_lookup_peak_flops_known(name, expected):
    assert M.lookup_peak_flops(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA RTX A4000",  # contains "A40" as a substring
        "NVIDIA RTX 6000 Ada Generation",
        "NVIDIA GeForce RTX 4090",
        "NVIDIA H100",  # ambiguous: SXM, PCIe or NVL?
        "NVIDIA H800",
        "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a slice of the GPU, not the whole peak
        "Intel(R) Xeon(R) Processor",
        "",
    ],
)
def test_lookup_peak_flops_unknown_is_none(name):
    assert M.lookup_peak_flops(name) is None


def test_cpu_peak_is_measured_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(P, "measure_matmul_flops", _real_measure)
    peak, source = M.peak_flops(torch.device("cpu"), budget_s=0.05)
    assert math.isfinite(peak) and peak > 0
    assert "measured" in source
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert len(cache) == 1 and next(iter(cache.values()))["flops"] == peak

    # Second call must come from the cache: make measuring impossible.
    def boom(*a, **k):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(P, "measure_matmul_flops", boom)
    peak2, source2 = M.peak_flops("cpu")
    assert peak2 == peak
    assert "cached" in source2


@pytest.mark.parametrize("name", ["NVIDIA H100 80GB HBM3", "NVIDIA H800"])
def test_cuda_peak_uses_table_or_measures(name, monkeypatch):
    """Fake a CUDA device name: a known GPU gets its datasheet number, an unknown one is measured
    (the autouse fixture's fake measurement says 1e11), never another GPU's number."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = M.peak_flops(torch.device("cuda", 0))
    if name == "NVIDIA H800":
        assert peak == 1e11 and "measured" in source
    else:
        assert peak == 989e12 and "datasheet" in source and "H100 SXM" in source


def test_cache_dir_respects_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("LATHE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert P._peak_cache_path() == tmp_path / "lathe" / "peak_flops.json"


def test_mfu_and_is_finite():
    assert M.mfu(6e9, 1000.0, 1e14) == pytest.approx(6.0)
    assert M.is_finite(torch.tensor(1.5)) and M.is_finite(2.0)
    assert not M.is_finite(torch.tensor(float("nan"))) and not M.is_finite(float("inf"))


# --- memory ---------------------------------------------------------------------------------------


def test_cpu_memory_monitor_sees_growth():
    mon = M.MemoryMonitor("cpu")
    before = mon.peak()
    assert before.gib > 0 and 0 < before.pct < 100
    buf = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched so it is resident
    after = mon.peak()
    del buf
    assert after.gib >= before.gib + 0.05


# --- MetricsProcessor -----------------------------------------------------------------------------


def test_metrics_processor_logs_on_schedule(tmp_path, caplog):
    losses = [5.0, 4.0, 3.0, 6.0, 1.0]
    mp = M.MetricsProcessor(
        log_freq=2, device=torch.device("cpu"), flops_per_token=1e6, dump_folder=tmp_path
    )
    logged = {}
    with caplog.at_level(logging.INFO, logger="lathe"):
        for step, loss in enumerate(losses, start=1):
            mp.data_loading_time(0.001)
            out = mp.step(
                step, torch.tensor(loss), ntokens=128, lr=1e-3, grad_norm=torch.tensor(0.5)
            )
            if out is not None:
                logged[step] = out
    mp.close()

    assert sorted(logged) == [1, 2, 4]
    # Windows: {1}, {2}, {3, 4}; step 5 is not logged.
    assert logged[1]["loss"] == 5.0 and logged[1]["max_loss"] == 5.0
    assert logged[2]["loss"] == 4.0 and logged[2]["max_loss"] == 4.0
    assert logged[4]["loss"] == pytest.approx(4.5) and logged[4]["max_loss"] == 6.0
    assert all(m["wps"] > 0 and m["mfu"] > 0 for m in logged.values())
    assert logged[4]["tokens_seen"] == 4 * 128 and mp.tokens_seen == 5 * 128
    assert logged[4]["grad_norm"] == 0.5 and logged[4]["lr"] == 1e-3

    console = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step:")]
    assert len(console) == 3 and all(CONSOLE_RE.match(line) for line in console)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["event"] == "start"
    assert rows[0]["peak_flops"] > 0 and rows[0]["peak_flops_source"]
    assert [r["step"] for r in rows[1:]] == [1, 2, 4]
    expected = {
        "step",
        "loss",
        "max_loss",
        "wps",
        "mfu",
        "lr",
        "grad_norm",
        "tokens_seen",
        "step_time",
        "data_loading_pct",
        "memory_gib",
        "memory_pct",
        "time",
    }
    assert all(expected <= r.keys() for r in rows[1:])


def test_metrics_processor_reduce_fn_and_model_parallel(tmp_path):
    seen = {}

    def fake_reduce(local):  # pretend another rank had twice the loss
        seen.update(local)
        return {"avg_loss": local["avg_loss"] * 1.5, "max_loss": local["max_loss"] * 2}

    kw = dict(log_freq=1, device="cpu", flops_per_token=1.0, dump_folder=tmp_path, jsonl=False)
    mp = M.MetricsProcessor(**kw, reduce_fn=fake_reduce, model_parallel_size=2)
    out = mp.step(1, torch.tensor(2.0), ntokens=100, lr=0.1, grad_norm=1.0)
    assert isinstance(seen["avg_loss"], torch.Tensor)
    assert out["loss"] == 3.0 and out["max_loss"] == 4.0
    assert not (tmp_path / "metrics.jsonl").exists()


def test_non_logging_rank_writes_nothing(tmp_path, caplog):
    mp = M.MetricsProcessor(
        log_freq=1, device="cpu", flops_per_token=1.0, dump_folder=tmp_path, is_logging_rank=False
    )
    with caplog.at_level(logging.INFO, logger="lathe"):
        assert mp.step(1, torch.tensor(1.0), ntokens=1, lr=0.0, grad_norm=0.0) is not None
    assert not any(r.getMessage().startswith("step:") for r in caplog.records)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_jsonl_writes_nan_as_null(tmp_path):
    log = M.JsonlLogger(tmp_path / "m.jsonl")
    log.log({"step": 1, "loss": float("nan")})
    log.close()
    row = json.loads((tmp_path / "m.jsonl").read_text())  # strict JSON: no bare NaN
    assert row["loss"] is None and "time" in row


# --- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_logger_writes_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    tb = M.TensorBoardLogger(tmp_path / "tb")
    tb.log({"step": 1, "loss": 3.0, "wps": 10.0, "memory_gib": 0.1}, step=1)
    tb.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


# --- profiling ------------------------------------------------------------------------------------


def test_profiler_writes_trace(tmp_path):
    a = torch.randn(32, 32)
    with maybe_profile(True, tmp_path, profile_freq=3, global_step=10) as prof:
        for _ in range(3):  # steps 11, 12, 13: step 12 is the one recorded (12 % 3 == 0)
            a = (a @ a).tanh()
            prof.step()
    trace = tmp_path / "iteration_12" / "rank0_trace.json"
    assert trace.exists()
    assert "traceEvents" in json.loads(trace.read_text())


def test_profiling_disabled_yields_none(tmp_path):
    with maybe_profile(False, tmp_path, 3) as prof:
        assert prof is None
    with maybe_memory_snapshot(False, tmp_path, 3) as snap:
        assert snap is None
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the CPU fallback")
def test_memory_snapshot_on_cpu_warns_and_does_nothing(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(profiling, "_warned_no_cuda", False)
    with caplog.at_level(logging.WARNING, logger="lathe"):
        with maybe_memory_snapshot(True, tmp_path, 3) as snap:
            assert snap is None
    assert any("need CUDA" in r.getMessage() for r in caplog.records)
    assert not any(tmp_path.iterdir())


def test_memory_snapshot_dumps_on_oom_and_reraises(tmp_path, monkeypatch):
    """The OOM path, on any machine: fake the CUDA memory-history API."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(
        torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls.append(k)
    )
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"segments": []})
    with pytest.raises(torch.OutOfMemoryError):
        with maybe_memory_snapshot(True, tmp_path, profile_freq=2, global_step=4) as snap:
            snap.step()  # step 5
            snap.step()  # step 6: periodic snapshot
            raise torch.OutOfMemoryError("fake OOM in step 7")
    assert (tmp_path / "iteration_6" / "rank0_memory_snapshot.pickle").exists()
    assert (tmp_path / "iteration_7_exit" / "rank0_memory_snapshot.pickle").exists()
    assert calls[-1] == {"enabled": None}  # history recording was switched off again


# --- CUDA (skipped on CPU-only machines) ----------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.gpu
def test_cuda_peak_and_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "measure_matmul_flops", _real_measure)
    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path))
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak, source = M.peak_flops(dev)
    assert peak > 0 and math.isfinite(peak)
    if M.lookup_peak_flops(name) is not None:
        assert "datasheet" in source
        measured, _ = _real_measure(dev, budget_s=0.3)
        # The measured bf16 matmul rate should be a healthy fraction of the datasheet peak, and
        # never above it (else the table entry, or its name matching, is wrong for this GPU).
        assert 0.3 * peak < measured < 1.05 * peak, (name, measured, peak)
    else:
        assert "measured" in source

    mon = M.MemoryMonitor(dev)
    x = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev)  # 256 MiB
    stats = mon.peak()
    assert stats.gib >= 0.25 and stats.allocated_gib >= 0.25 and 0 < stats.pct < 100
    del x
    torch.cuda.empty_cache()
    mon.reset_peak()
    assert mon.peak().allocated_gib < 0.25


@cuda
@pytest.mark.gpu
def test_cuda_memory_snapshot_and_oom(tmp_path):
    with maybe_memory_snapshot(True, tmp_path, profile_freq=2) as snap:
        for _ in range(2):
            torch.randn(1024, 1024, device="cuda").sum()
            snap.step()
    assert (tmp_path / "iteration_2" / "rank0_memory_snapshot.pickle").stat().st_size > 0

    with pytest.raises(torch.OutOfMemoryError):
        with maybe_memory_snapshot(True, tmp_path, profile_freq=100, global_step=7):
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB: cannot fit
    assert (tmp_path / "iteration_8_exit" / "rank0_memory_snapshot.pickle").exists()


@cuda
@pytest.mark.gpu
def test_cuda_profiler_trace_has_kernels(tmp_path):
    a = torch.randn(512, 512, device="cuda")
    with maybe_profile(True, tmp_path, profile_freq=2) as prof:
        for _ in range(2):
            a = (a @ a).tanh()
            prof.step()
    trace = json.loads((tmp_path / "iteration_2" / "rank0_trace.json").read_text())
    assert any(e.get("cat") == "kernel" for e in trace["traceEvents"])
