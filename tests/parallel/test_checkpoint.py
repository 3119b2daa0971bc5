"""Distributed checkpoints: exact resume, elastic resume, crash safety, async modes, preemption,
retention, seed checkpoints, weights-only export and Hugging Face conversion.

Runs: 6 steps of the tiny Llama with a checkpoint every 3 steps. "Resume" removes step-6 and runs
again: it must load step-3 and reproduce steps 4-6.
- Same layout: equal losses. They are bitwise equal in almost every run, but MKL's float32 kernels
  may round the last bit differently when memory alignment differs between processes (observed:
  one step in one of several runs, 1 ulp), so ``same`` allows 1e-6 relative (a few ulps). A real
  resume bug (wrong data position, optimizer or LR state) moves the loss by far more.
- Different layout: within 1e-5 relative (sums reduce in another order).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lathe.checkpoint.manager import complete_steps
from lathe.config import load_config
from lathe.errors import ConfigError
from lathe.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from multi_worker import Batch, needed  # noqa: E402
from worker import load_result  # noqa: E402

HERE = Path(__file__).parent
BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--optimizer.lr", "1e-3",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--training.mixed_precision_param",
        "float32", "--checkpoint.enable_checkpoint", "--checkpoint.interval", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_local(folder, *extra, steps=6, batch=2):
    cfg, _ = load_config([*BASE, "--training.steps", str(steps), "--training.batch_size", str(batch),
                          "--job.dump_folder", str(folder), *extra])
    return train(cfg).losses


def run_torchrun(nproc, folder, *extra, steps=6, batch=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(HERE / "worker.py"), *BASE, "--training.steps", str(steps),
           "--training.batch_size", str(batch), "--job.dump_folder", str(folder), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return load_result(Path(folder))["losses"]


def same(resumed, straight):
    return all(resumed[s] == pytest.approx(straight[s], rel=1e-6, abs=0) for s in resumed)


def drop_latest(folder):
    shutil.rmtree(Path(folder) / "checkpoint" / "step-6")


@pytest.fixture(scope="module")
def straight_6(tmp_path_factory):
    """The uninterrupted one-process run (6 steps, batch 2, synchronous saves) that the crash and
    separate-writer tests compare against: trained once per module."""
    return run_local(tmp_path_factory.mktemp("straight"))


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    """A finished 3-step one-process run with its step-3 checkpoint; copy it before changing it."""
    folder = tmp_path_factory.mktemp("three") / "run"
    run_local(folder, steps=3)
    assert complete_steps(folder / "checkpoint") == [3]
    return folder


def copy_run(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def logged_losses(folder):
    lines = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


# --- exact resume ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_exact_resume_single_process(tmp_path, mode):
    straight = run_local(tmp_path, "--checkpoint.async_mode", mode)
    assert complete_steps(tmp_path / "checkpoint") == [3, 6]
    drop_latest(tmp_path)
    resumed = run_local(tmp_path, "--checkpoint.async_mode", mode)
    assert sorted(resumed) == [4, 5, 6]  # it really started from step 3
    assert same(resumed, straight), (resumed, straight)


# --- under torchrun: the runs of every test below, in two torchrun jobs -------------------------
# Each torchrun launch costs a fresh Python, torch and gloo start per process (~5 s for 2
# processes, ~14 s for 8 on a 2-core machine), more than these runs train. So the runs that
# checkpoint ("straight") share one torchrun job (multi_worker.py) and the runs that resume from
# their checkpoints share a second one, started once the first has ended: every resume still runs
# in other processes than the run that saved, as a real restart does.

EXACT = {"fsdp2": (2, ["--parallelism.dp_shard", "2"]),
         "tp2": (2, ["--parallelism.tp", "2", "--parallelism.dp_shard", "1"]),
         "fsdp2xtp2": (4, ["--parallelism.dp_shard", "2", "--parallelism.tp", "2"]),
         "pp2xfsdp2xtp2": (8, ["--parallelism.pp", "2", "--parallelism.dp_shard", "2", "--parallelism.tp", "2"])}
LOOPED_PP = ["--parallelism.pp", "2", "--parallelism.dp_shard", "1", "--parallelism.pp_schedule", "Interleaved1F1B",
             "--parallelism.pp_microbatches", "2"]
# name: (processes, overrides, batch per rank) of the straight runs, and of the runs of the second
# job, which start from a checkpoint: the resumes, in a straight run's folder (RESUME_FROM) after its
# step-6 checkpoint is dropped, and the run in a seed checkpoint's folder (written in-process while
# the first job runs)
STRAIGHT = {**{name: (nproc, layout, 2) for name, (nproc, layout) in EXACT.items()},
            "looped_pp": (2, LOOPED_PP, 2),
            "elastic_fsdp4": (4, ["--parallelism.dp_shard", "4"], 2)}  # global batch 8
RESUMED = {**{name: (nproc, layout, 2) for name, (nproc, layout) in EXACT.items()},
           "elastic_fsdp2": (2, ["--parallelism.dp_shard", "2"], 4),  # global batch 8
           "from_seed": (2, ["--parallelism.dp_shard", "2"], 1)}
RESUME_FROM = {**{name: name for name in EXACT}, "elastic_fsdp2": "elastic_fsdp4"}


def needs(test: str, params: dict) -> list[str]:
    if test == "test_exact_resume_distributed":
        return [params["name"]]
    return {"test_exact_resume_pp2_fsdp2_tp2_eight_processes": ["pp2xfsdp2xtp2"],
            "test_looped_pipeline_checkpoint_loads_into_one_process": ["looped_pp"],
            "test_elastic_resume_fsdp4_to_fsdp2_and_to_one_process": ["elastic_fsdp4", "elastic_fsdp2"],
            "test_seed_checkpoint_is_model_only_and_used_by_a_parallel_run": ["from_seed"]}.get(test, [])


def worker_args(layout, batch, steps=6):
    return [*BASE, "--training.steps", str(steps), "--training.batch_size", str(batch), *layout]


class TorchrunRuns:
    """The selected straight runs in one torchrun job, then the selected runs from a checkpoint
    in another. ``straight(name)`` / ``resumed(name)``: a run's losses (and ``*_folder``: its dump
    folder); a run that broke, or whose straight run broke, fails exactly the tests that use it."""

    def __init__(self, folder: Path, selected: set):
        self.folder = folder
        self.selected = selected
        self.errors: dict[str, str] = {}
        self.straight_losses: dict[str, dict] = {}
        self.seed_meta = None
        for job in ("straight", "resumed"):
            (folder / job).mkdir()
        self.first = Batch(folder / "straight", [(n, nproc, "worker", worker_args(layout, batch))
                                                 for n, (nproc, layout, batch) in STRAIGHT.items() if n in selected])
        self.second = None
        if "from_seed" in selected:  # a model-only seed checkpoint (seed 7), for the run to start from
            seed_folder = folder / "resumed" / "from_seed"
            cfg, _ = load_config([*BASE, "--training.steps", "6", "--job.dump_folder", str(seed_folder),
                                  "--checkpoint.create_seed_checkpoint", "--training.seed", "7"])
            train(cfg)
            self.seed_meta = json.loads((seed_folder / "checkpoint" / "step-0" / "train_state.json").read_text())

    def straight_folder(self, name: str) -> Path:
        self._wait_first()
        if name in self.errors:
            pytest.fail(self.errors[name], pytrace=False)
        return self.folder / "straight" / name

    def straight(self, name: str) -> dict:
        self._wait_first()
        if name in self.errors:
            pytest.fail(self.errors[name], pytrace=False)
        return self.straight_losses[name]

    def resumed_folder(self, name: str) -> Path:
        self._wait_first()
        if name in self.errors:
            pytest.fail(self.errors[name], pytrace=False)
        return self.second.folder(name)

    def resumed(self, name: str) -> dict:
        return load_result(self.resumed_folder(name))["losses"]

    def close(self) -> None:
        for batch in (self.first, self.second):
            if batch is not None:
                batch.close()

    def _wait_first(self) -> None:
        """Once: every straight run done (or failed), its job ended; then start the resumes."""
        if self.second is not None:
            return
        for name in STRAIGHT:
            if name not in self.selected:
                continue
            try:
                self.straight_losses[name] = load_result(self.first.folder(name))["losses"]
            except pytest.fail.Exception as e:
                self.errors[name] = str(e)
        if self.first.proc is not None:  # its processes leave (killed if they linger): the resumes run in new ones
            try:
                self.first.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                pass
        self.first.close()
        resumes = []
        for name, (nproc, layout, batch) in RESUMED.items():
            if name not in self.selected:
                continue
            if name == "from_seed":
                resumes.append((name, nproc, "worker", worker_args(layout, batch)))
                continue
            source = RESUME_FROM[name]
            if source in self.errors:
                self.errors[name] = f"its straight run {source} failed:\n{self.errors[source]}"
                continue
            src = self.folder / "straight" / source
            dst = self.folder / "resumed" / name
            shutil.move(src, dst)  # the straight run's losses are read already
            drop_latest(dst)
            if name == "elastic_fsdp2":  # the one-process resume gets its own copy of the checkpoint
                shutil.copytree(dst / "checkpoint", self.folder / "single" / "checkpoint")
            (dst / "metrics.jsonl").unlink()
            resumes.append((name, nproc, "worker", worker_args(layout, batch)))
        self.second = Batch(self.folder / "resumed", resumes)


@pytest.fixture(scope="module")
def torchrun_runs(request, tmp_path_factory):
    runs = TorchrunRuns(tmp_path_factory.mktemp("torchrun"), needed(request, needs))
    yield runs
    runs.close()


@pytest.mark.parametrize("name", ["fsdp2", "tp2", "fsdp2xtp2"])
def test_exact_resume_distributed(torchrun_runs, name):
    straight, resumed = torchrun_runs.straight(name), torchrun_runs.resumed(name)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert sorted(resumed) == [4, 5, 6]
    assert same(resumed, straight), (resumed, straight)


def test_exact_resume_pp2_fsdp2_tp2_eight_processes(torchrun_runs):
    straight, resumed = torchrun_runs.straight("pp2xfsdp2xtp2"), torchrun_runs.resumed("pp2xfsdp2xtp2")
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    assert sorted(resumed) == [4, 5, 6]
    assert same(resumed, straight), (resumed, straight)


def test_looped_pipeline_checkpoint_loads_into_one_process(tmp_path, torchrun_runs):
    """Two stages per rank (two model parts, two optimizers per rank) save; one process resumes."""
    straight = torchrun_runs.straight("looped_pp")
    shutil.copytree(torchrun_runs.straight_folder("looped_pp") / "checkpoint", tmp_path / "a" / "checkpoint")
    drop_latest(tmp_path / "a")
    single = run_local(tmp_path / "a")
    assert sorted(single) == [4, 5, 6]
    for s in single:
        assert single[s] == pytest.approx(straight[s], rel=1e-5)


def test_elastic_resume_fsdp4_to_fsdp2_and_to_one_process(torchrun_runs):
    """Global batch 8 throughout: FSDP x4 with 2 per rank, then FSDP x2 with 4, then 1 x 8."""
    straight = torchrun_runs.straight("elastic_fsdp4")
    fsdp2 = torchrun_runs.resumed("elastic_fsdp2")
    single = run_local(torchrun_runs.folder / "single", batch=8)
    for resumed in (fsdp2, single):
        assert sorted(resumed) == [4, 5, 6]
        for s in resumed:
            assert resumed[s] == pytest.approx(straight[s], rel=1e-5)


# --- crash safety ------------------------------------------------------------------------------

@pytest.mark.parametrize("point,mode", [("dcp_write", "disabled"), ("before_commit", "disabled"),
                                        ("dcp_write", "async")])
def test_crash_during_save_resumes_from_previous_checkpoint(tmp_path, straight_6, point, mode):
    straight = straight_6
    folder = tmp_path / "crash"
    cmd = [sys.executable, str(HERE / "crash_worker.py"), point, "2", *BASE, "--training.steps", "6",
           "--training.batch_size", "2", "--job.dump_folder", str(folder), "--checkpoint.async_mode", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 9, proc.stdout[-2000:] + proc.stderr[-3000:]  # killed in the 2nd save
    assert complete_steps(folder / "checkpoint") == [3]
    assert any(".partial-" in p.name for p in (folder / "checkpoint").iterdir())
    resumed = run_local(folder)
    assert sorted(resumed) == [4, 5, 6]
    assert same(resumed, straight), (resumed, straight)
    assert complete_steps(folder / "checkpoint") == [3, 6]
    assert not any(".partial-" in p.name for p in (folder / "checkpoint").iterdir())


# --- async with a separate writer process -------------------------------------------------------

def test_async_with_pinned_mem_saves_in_a_separate_process_and_resumes(tmp_path, straight_6):
    straight = straight_6
    folder = tmp_path / "proc"
    cmd = [sys.executable, "-m", "lathe", "train", *BASE, "--training.steps", "6", "--training.batch_size", "2",
           "--job.dump_folder", str(folder), "--checkpoint.async_mode", "async_with_pinned_mem"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "writing in the background (async_with_pinned_mem)" in proc.stdout
    drop_latest(folder)
    resumed = run_local(folder)
    assert same(resumed, straight), (resumed, straight) and sorted(resumed) == [4, 5, 6]


# --- preemption --------------------------------------------------------------------------------

def test_sigterm_saves_current_step_and_exits_75_then_resumes_exactly(tmp_path):
    steps = 40
    straight = run_local(tmp_path / "ref", "--checkpoint.interval", "1000", steps=steps)
    folder = tmp_path / "pre"
    cmd = [sys.executable, "-m", "lathe", "train", *BASE, "--training.steps", str(steps), "--training.batch_size",
           "2", "--job.dump_folder", str(folder), "--checkpoint.interval", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = folder / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count('"loss"') >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out[-3000:]
    saved = complete_steps(folder / "checkpoint")
    assert len(saved) == 1 and 3 <= saved[0] < steps, saved
    resumed = run_local(folder, "--checkpoint.interval", "1000", steps=steps)
    assert min(resumed) == saved[0] + 1
    assert same(resumed, straight), (resumed, straight)


# --- retention, seed checkpoint, export --------------------------------------------------------

def test_keep_latest_k(tmp_path):
    run_local(tmp_path, "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2", steps=5)
    assert complete_steps(tmp_path / "checkpoint") == [4, 5]


def test_seed_checkpoint_is_model_only_and_used_by_a_parallel_run(tmp_path, straight_6, torchrun_runs):
    """The seed checkpoint (seed 7) is written in-process by TorchrunRuns, then an FSDP x2 run
    (seed 42, batch 1 per rank) starts in its folder and loads step-0."""
    from_seed = torchrun_runs.resumed("from_seed")
    assert torchrun_runs.seed_meta["contents"] == ["model"]
    with_seed7 = run_local(tmp_path / "ref", "--training.seed", "7", "--no-checkpoint.enable_checkpoint", batch=2)
    without = straight_6  # seed 42, batch 2, no seed checkpoint (step 1's loss: the initial weights)
    assert from_seed[1] == pytest.approx(with_seed7[1], rel=1e-5)  # the seed checkpoint's weights
    assert from_seed[1] != pytest.approx(without[1], rel=1e-5)


def test_weights_only_final_export_in_bf16(tmp_path):
    run_local(tmp_path, "--checkpoint.model_weights_only", "--checkpoint.export_dtype", "bfloat16", steps=3)
    final = tmp_path / "checkpoint" / "step-3"
    meta = json.loads((final / "train_state.json").read_text())
    assert meta["contents"] == ["model"]
    from lathe.checkpoint.hf import load_lathe_weights

    # loading converts into the model's fp32 tensors; the stored data was bf16
    md = torch.distributed.checkpoint.FileSystemReader(str(final)).read_metadata()
    dtypes = {m.properties.dtype for k, m in md.state_dict_metadata.items() if k.startswith("model.")}
    assert dtypes == {torch.bfloat16}
    args, weights = load_lathe_weights(final)
    assert "layers.0.attention.wq.weight" in weights


# --- Hugging Face conversion -------------------------------------------------------------------

def test_hf_round_trip_logits(tmp_path, three_steps):
    transformers = pytest.importorskip("transformers")
    from lathe.checkpoint.hf import hf_to_lathe, lathe_to_hf, load_lathe_weights
    from lathe.models.llama import Transformer

    copy_run(three_steps, tmp_path)
    ckpt = tmp_path / "checkpoint" / "step-3"
    args, weights = load_lathe_weights(ckpt)
    ours = Transformer(args)
    ours.load_state_dict(weights)
    ours.init_rope("cpu")
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    with torch.no_grad():
        expected = ours(tokens)
    lathe_to_hf(ckpt, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, expected, atol=1e-5, rtol=1e-5)
    back = hf_to_lathe(tmp_path / "hf", tmp_path / "back")
    args2, weights2 = load_lathe_weights(back)
    assert args2.ffn_hidden_dim == args.ffn_hidden_dim and args2.kv_heads == args.kv_heads
    again = Transformer(args2)
    again.load_state_dict(weights2)
    again.init_rope("cpu")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), expected, atol=1e-5, rtol=1e-5)
    # and a run can start from the converted weights
    losses = run_local(tmp_path / "fromhf", "--checkpoint.initial_load_path", str(back), steps=1)
    assert 1 in losses


def test_convert_cli(tmp_path):
    run_local(tmp_path, steps=1, )
    out = subprocess.run([sys.executable, "-m", "lathe", "convert", "lathe-to-hf", str(tmp_path / "checkpoint" / "step-1"),
                          str(tmp_path / "hf"), "--dtype", "bfloat16"], capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# --- errors ------------------------------------------------------------------------------------

def test_checkpoint_of_another_model_is_refused(tmp_path, three_steps):
    copy_run(three_steps, tmp_path)
    with pytest.raises(ConfigError, match="holds a different model"):
        run_local(tmp_path, "--model.flavor", "debugmodel", steps=4)


def test_corrupted_checkpoint_gives_a_clear_error(tmp_path, three_steps):
    copy_run(three_steps, tmp_path)
    shard = next((tmp_path / "checkpoint" / "step-3").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ConfigError, match="no usable checkpoint .*step-3.*truncated"):
        run_local(tmp_path, steps=4)


def test_missing_load_step_and_initial_path(tmp_path, three_steps):
    copy_run(three_steps, tmp_path)
    with pytest.raises(ConfigError, match="no checkpoint step-2"):
        run_local(tmp_path, "--checkpoint.load_step", "2", steps=4)
    with pytest.raises(ConfigError, match="initial_load_path"):
        run_local(tmp_path / "x", "--checkpoint.initial_load_path", str(tmp_path / "nope"))
