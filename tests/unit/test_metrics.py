"""Unit tests for lathe.metrics and lathe.profiling (CPU only, a few seconds in total)."""

from __future__ import annotations

import json
import logging
import math
import re
import time

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
    r"(  \| tokens\(global\): [\d,]+  lr: \d\.\d{3}e[+-]\d{2}  gnorm: \d+\.\d{4}  "
    r"step_time: \d+\.\d{2}s  data: \d+\.\d%(  elapsed: \w+)?(  eta: \w+)?"
    r"(  skipped: \d+( \([a-z -]+\d+(, [a-z -]+\d+)?\))?)?(  rollbacks: \d+)?)?$"
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
    monkeypatch.setattr(P, "measure_matmul_flops", lambda device, budget_s=0.5, dtype=None: (1e11, "fake"))
    monkeypatch.setattr(P, "TRIAL_PAUSE_S", 0.0)


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
        "| tokens(global): 163,840  lr: 8.000e-04  gnorm: 1.2345  step_time: 0.94s  data: 0.3%"
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
    import mmap

    mon = M.MemoryMonitor("cpu")
    before = mon.peak()
    assert before.gib > 0 and 0 < before.pct < 100
    # 64 MiB of fresh pages, written so they are resident. Not a tensor: once an in-process run has
    # set training.cpu_allocator retain, malloc may serve a tensor from memory already resident.
    buf = mmap.mmap(-1, 64 * 1024 * 1024)
    buf.write(b"\1" * len(buf))
    after = mon.peak()
    buf.close()
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
    steps = [r for r in rows if "event" not in r]  # (a "peak_flops" event may come between them)
    assert [r["step"] for r in steps] == [1, 2, 4]
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
    assert all(expected <= r.keys() for r in steps)


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


# --- progress: elapsed, ETA, global tokens, skip counters (issue 14) ------------------------------


def test_console_line_progress_and_counters():
    line = M.format_console_line(step=10, loss=7.1234, memory_gib=0.52, memory_pct=2.14, wps=1710.4, mfu=3.5,
                                 tokens_seen=163840, lr=8e-4, grad_norm=1.2345, step_time=0.94, data_loading_pct=0.3,
                                 elapsed=3725, eta=65, counters={"skipped_steps": 2, "nonfinite_steps": 1,
                                                                  "spike_steps": 1, "rollbacks": 0})
    assert line.endswith("elapsed: 1h02m  eta: 1m05s  skipped: 2 (non-finite 1, spike 1)")
    assert CONSOLE_RE.match(line)
    from lathe.metrics.console import format_duration

    assert [format_duration(s) for s in (0, 59.6, 61, 3600, 90061)] == ["0s", "1m00s", "1m01s", "1h00m", "1d01h"]


def test_processor_global_tokens_eta_and_skipped_steps(tmp_path):
    mp = M.MetricsProcessor(log_freq=2, device="cpu", flops_per_token=10.0, attention_flops_per_token=4.0,
                            dump_folder=tmp_path, dp_degree=4, total_steps=10)
    out = None
    for step in (1, 2, 3, 4):
        # step 3's update was skipped: its (NaN) loss stays out of the window's average
        loss = float("nan") if step == 3 else float(step)
        out = mp.step(step, torch.tensor(loss), ntokens=100, lr=1e-3, grad_norm=1.0, skipped=step == 3,
                      counters={"skipped_steps": int(step >= 3)}) or out
    mp.close()
    assert out["step"] == 4 and out["loss"] == 4.0 and out["max_loss"] == 4.0
    assert out["tokens_seen"] == 4 * 100 * 4 and out["tokens_seen_per_rank"] == 400
    assert out["skipped_steps"] == 1
    assert out["eta"] >= 0 and out["elapsed"] > 0
    # causal-aware MFU counts half of the attention FLOPs: (10 - 2) / 10 of the full-S^2 figure
    assert out["mfu_causal"] == pytest.approx(out["mfu"] * 0.8)
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["peak_flops_dtype"] == "float32" == start["compute_dtype"]
    assert "S x S" in start["flops_convention"]


def test_window_of_only_skipped_steps_logs_null_loss(tmp_path):
    mp = M.MetricsProcessor(log_freq=1, device="cpu", flops_per_token=1.0, dump_folder=tmp_path)
    out = mp.step(1, torch.tensor(float("nan")), ntokens=1, lr=0.0, grad_norm=0.0, skipped=True)
    mp.close()
    assert math.isnan(out["loss"])
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])["loss"] is None


def test_sinks_fan_out_and_events(tmp_path):
    got = []

    class Recorder:
        def log(self, record, step=None):
            got.append((dict(record), step))

        def close(self, exit_code=0):
            got.append(("closed", exit_code))

    mp = M.MetricsProcessor(log_freq=1, device="cpu", flops_per_token=1.0, dump_folder=tmp_path, sinks=[Recorder()])
    mp.step(1, torch.tensor(2.0), ntokens=1, lr=0.0, grad_norm=0.0)
    mp.log_validation(1, {"val_loss": 1.5, "val_perplexity": 4.5, "val_tokens": 10})
    mp.log_event({"event": "skip", "step": 1})
    mp.close(exit_code=3)
    assert got[0][0]["event"] == "start" and got[0][1] is None
    assert got[1][1] == 1 and got[1][0]["loss"] == 2.0
    assert got[2] == ({"step": 1, "val_loss": 1.5, "val_perplexity": 4.5, "val_tokens": 10}, 1)
    assert got[3] == ({"event": "skip", "step": 1}, None) and got[4] == ("closed", 3)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in rows] == ["start", None, None, "skip"]


# --- MFU you can trust: the peak in the run's dtype, robust, re-measured (issue 17 item 4) --------


def _counting_measure(monkeypatch, value=1e11):
    calls = []

    def fake(device, budget_s=0.5, dtype=None):
        calls.append(dtype)
        return value, f"fake {dtype}"

    monkeypatch.setattr(P, "measure_matmul_flops", fake)
    return calls


def test_peak_is_measured_in_the_compute_dtype_with_several_trials(tmp_path, monkeypatch):
    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path))
    calls = _counting_measure(monkeypatch)
    peak, source = M.peak_flops("cpu", dtype=torch.bfloat16)
    assert calls == [torch.bfloat16] * P.TRIALS and "bfloat16" in source and "best of 3 trials" in source
    M.peak_flops("cpu", dtype=torch.bfloat16)  # cached now
    assert len(calls) == P.TRIALS
    M.peak_flops("cpu", dtype=torch.float32)  # another dtype is another measurement
    assert calls[P.TRIALS:] == [torch.float32] * P.TRIALS
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert sorted(e["dtype"] for e in cache.values()) == ["bfloat16", "float32"]


@pytest.mark.parametrize("stale", ["old_format", "too_old", "other_torch", "other_threads"])
def test_stale_peak_cache_is_measured_again(tmp_path, monkeypatch, stale):
    """An entry written by lathe's first, single-trial method (like the 0.067 TFLOP/s one measured
    while the machine was busy), one older than CACHE_MAX_AGE_DAYS, or one whose torch version or
    thread count differs from now is measured again."""
    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path))
    calls = _counting_measure(monkeypatch, value=2e11)
    M.peak_flops("cpu")
    key, entry = next(iter(json.loads((tmp_path / "peak_flops.json").read_text()).items()))
    entry["flops"] = 0.067e12
    if stale == "old_format":
        entry = {"flops": 0.067e12, "method": "best of 3 runs", "measured_at": "2024-01-01 00:00:00"}
    elif stale == "too_old":
        entry["measured_unix"] -= (P.CACHE_MAX_AGE_DAYS + 1) * 86400
    elif stale == "other_torch":
        entry["torch"] = "2.11.0"
    else:
        entry["threads"] = torch.get_num_threads() + 7
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: entry}))
    calls.clear()
    peak, source = M.peak_flops("cpu")
    assert len(calls) == P.TRIALS and peak == 2e11 and "just now" in source


def test_peak_below_what_a_run_achieves_is_measured_again(tmp_path, monkeypatch, caplog):
    """A cached peak of 1e9 FLOP/s while the run does 1e6 FLOPs/token at ~1e4 tokens/s: MFU would
    be ~1000%. The processor measures again (once), and if the machine still measures lower than
    what the run achieved, the achieved rate is the peak."""
    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path))
    calls = _counting_measure(monkeypatch, value=1e9)
    mp = M.MetricsProcessor(log_freq=1, device="cpu", flops_per_token=1e6, dump_folder=tmp_path)
    assert mp.peak_flops == 1e9 and len(calls) == P.TRIALS
    monkeypatch.setattr(time, "perf_counter", lambda _t=iter(range(0, 10**9, 1)): next(_t) * 1e-3)
    with caplog.at_level(logging.INFO, logger="lathe"):
        out = mp.step(1, torch.tensor(1.0), ntokens=10_000, lr=0.0, grad_norm=0.0)
    mp.close()
    assert len(calls) == 2 * P.TRIALS  # measured again
    assert mp.peak_flops >= 1e6 * out["wps"] and out["mfu"] <= 100.0 + 1e-9
    assert "a new measurement gave only" in mp.peak_flops_source
    assert any("above the measured peak" in r.getMessage() for r in caplog.records)
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "peak_flops" for e in events)
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert next(iter(cache.values()))["flops"] == mp.peak_flops  # the cache is corrected too


def test_cuda_fp32_run_is_measured_not_given_the_bf16_datasheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    peak, source = M.peak_flops(torch.device("cuda", 0), dtype=torch.float32)
    assert peak == 1e11 and "measured float32" in source
    peak, source = M.peak_flops(torch.device("cuda", 0), dtype=torch.bfloat16)
    assert peak == 989e12 and "datasheet bfloat16" in source


def test_progress_line_for_long_non_training_work(monkeypatch):
    from lathe.metrics import progress as prog

    clock = iter([0.0, 1.0, 4.0, 6.0, 15.0, 16.0, 100.0, 100.0, 100.0])  # start, per update, close; then "fast"
    monkeypatch.setattr(prog.time, "monotonic", lambda: next(clock))
    lines = []
    with prog.Progress("corpus", total=10, unit="files", every_s=10, first_s=3, log=lines.append) as p:
        for _ in range(4):
            p.update(2)
    assert lines[0] == "corpus: [########............]  40% 4/10 files  1/s  elapsed 4s  eta 6s"
    assert lines[1].startswith("corpus: [################....]  80% 8/10 files")  # 15s: 10s after the first
    assert lines[2].endswith("done") and len(lines) == 3
    quiet = []
    with prog.Progress("fast", total=3, log=quiet.append, first_s=3600) as p:
        p.update(3)
    assert quiet == []  # quick work prints nothing


@pytest.mark.parametrize("now,new_value,expected", [(0.5, 2e11, 2e11), (0.5, 0.5e11, 1e11), (2.5, 2e11, 1e11)])
def test_cpu_peak_measured_under_load_is_measured_again_when_quieter(tmp_path, monkeypatch, now, new_value,
                                                                     expected):
    """A peak measured under a 1-minute load average of 3.0 (other work on the cores): a run that
    starts at load 0.5 measures again and keeps the higher value; at 2.5 (less than LOAD_DROP
    lower) the cached peak stands. The load the kept value stands for is recorded."""
    monkeypatch.setenv("LATHE_CACHE_DIR", str(tmp_path))
    calls = _counting_measure(monkeypatch, value=1e11)
    monkeypatch.setattr(P, "_load_average", lambda: 3.0)
    assert M.peak_flops("cpu")[0] == 1e11
    key, entry = next(iter(json.loads((tmp_path / "peak_flops.json").read_text()).items()))
    assert entry["load"] == 3.0
    calls.clear()
    calls = _counting_measure(monkeypatch, value=new_value)
    monkeypatch.setattr(P, "_load_average", lambda: now)
    peak, source = M.peak_flops("cpu")
    assert peak == expected
    assert len(calls) == (P.TRIALS if now == 0.5 else 0)
    entry = json.loads((tmp_path / "peak_flops.json").read_text())[key]
    assert entry["flops"] == expected and entry["load"] == (now if now == 0.5 else 3.0)
    if now == 0.5 and new_value < 1e11:
        assert "a new measurement gave only 0.05 TFLOP/s" in source
