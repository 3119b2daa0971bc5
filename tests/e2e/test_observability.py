"""Seeing and steering a run, through the command line: W&B (the real wandb library, offline), the
run manifest, `lathe plot`, `lathe compare` and `lathe replay`.

Runs (tiny model, 8 steps each): A trains 8 steps with checkpoints at 4 and 8, loses its step-8
checkpoint and resumes from step 4 (W&B offline on both); B is A with another learning rate.
`lathe replay A` reruns A from its run.json, and `lathe compare` tells whether it reproduced.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest

from lathe.errors import ConfigError
from lathe.metrics.plot import plot_runs

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import lathe, show  # noqa: E402

TRAIN = ["train", "--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
         "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--training.steps", "8"]
WANDB = ["--metrics.enable_wandb", "--metrics.wandb_mode", "offline", "--metrics.wandb_project", "lathe-test",
         "--metrics.wandb_run_name", "run-a", "--metrics.wandb_tags", "ci,tiny"]


# --- reading what W&B wrote, with wandb's own record types ------------------------------------------


def wandb_records(path: Path):
    """The records of a .wandb file: wandb's protobuf ``Record`` messages in LevelDB-style log
    framing (7-byte file header; 32 KiB blocks of chunks: CRC, length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):  # FIRST, MIDDLE
            pending = (pending if kind == 3 else b"") + chunk
            continue
        if kind not in (1, 4):  # padding
            continue
        record = pb.Record()
        record.ParseFromString(pending + chunk if kind == 4 else chunk)
        pending = b""
        yield record


def wandb_run(run_dir: Path) -> dict:
    """The run record (id, project, name, tags, config) and the logged history rows of one offline run."""
    files = list(run_dir.glob("run-*.wandb"))
    assert len(files) == 1, list(run_dir.iterdir())
    out = {"history": [], "config": {}}
    for r in wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, project=r.run.project, name=r.run.display_name, tags=list(r.run.tags))
            out["config"].update({c.key: json.loads(c.value_json) for c in r.run.config.update})
        elif kind == "config":
            out["config"].update({c.key: json.loads(c.value_json) for c in r.config.update})
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return out


def jsonl(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "a", root / "b"
    ckpt = ["--checkpoint.enable_checkpoint", "--checkpoint.interval", "4"]
    p = lathe(*TRAIN, *ckpt, *WANDB, "--job.dump_folder", str(a), cwd=root)
    assert p.returncode == 0, show(p)
    shutil.rmtree(a / "checkpoint" / "step-8")
    p = lathe(*TRAIN, *ckpt, *WANDB, "--job.dump_folder", str(a), cwd=root)  # resumes at step 4
    assert p.returncode == 0, show(p)
    p = lathe(*TRAIN, "--optimizer.lr", "2e-3", "--metrics.plot_at_end", "--job.dump_folder", str(b), cwd=root)
    assert p.returncode == 0, show(p)
    return root, a, b


def test_wandb_offline_holds_metrics_and_config_and_resume_continues_the_run(runs):
    _, a, _ = runs
    offline = sorted((a / "wandb").glob("offline-run-*"))
    assert len(offline) == 2  # the first run, then the resumed one
    first, resumed = wandb_run(offline[0]), wandb_run(offline[1])
    state = json.loads((a / "checkpoint" / "step-8" / "train_state.json").read_text())["train_state"]
    assert first["id"] == resumed["id"] == state["wandb_run_id"]  # the same W&B run, continued
    assert first["project"] == "lathe-test" and first["name"] == "run-a" and first["tags"] == ["ci", "tiny"]
    assert first["config"]["training"]["steps"] == 8 and first["config"]["optimizer"]["lr"] == 8e-4
    assert resumed["config"]["lathe_start"]["peak_flops_dtype"] == "float32"
    assert [row["step"] for row in resumed["history"] if "loss" in row] == [5, 6, 7, 8]
    logged = {row["step"]: row for row in first["history"] + resumed["history"] if "loss" in row}
    assert sorted(logged) == list(range(1, 9))
    ours = {r["step"]: r for r in jsonl(a) if "loss" in r}
    for step, row in logged.items():  # everything the JSONL has, the same values
        assert row["loss"] == pytest.approx(ours[step]["loss"], rel=1e-12)
        assert {"grad_norm", "lr", "wps", "mfu", "tokens_seen", "eta", "skipped_steps"} <= row.keys()


def test_manifest_is_written_and_complete(runs):
    _, a, _ = runs
    m = json.loads((a / "run.json").read_text())
    assert m["status"] == "completed" and m["exit_code"] == 0 and m["steps"] == 8 and m["tokens"] == 8 * 64
    assert m["lathe"]["version"] and "git_commit" in m["lathe"]
    assert m["versions"]["torch"].startswith("2.") and "cuda" in m["versions"] and "nccl" in m["versions"]
    assert m["hardware"]["cpu_count"] >= 1 and m["hardware"]["cpu"] and m["hardware"]["gpu_count"] >= 0
    assert m["world"] == {"world_size": 1, "nodes": 1, "processes_per_node": 1,
                          "layout": {"dp_replicate": 1, "dp_shard": 1, "tp": 1, "pp": 1, "cp": 1}}
    assert len(m["config_hash"]) == 64 and m["config"]["training"]["steps"] == 8
    assert len(m["tokenizer"]["sha256"]) == 64 and m["data"][0]["kind"] == "corpus" and len(m["data"][0]["sha256"]) == 64
    assert m["start_time"] <= m["end_time"]
    assert [r["status"] for r in m["previous_runs"]] == ["completed"]  # the first 4 steps, then the resume


def _curve_pixels(png: Path, rgb: tuple[int, int, int], tol: int = 40) -> tuple[int, int]:
    """(pixels close to ``rgb``, distinct columns holding one): a curve spans many columns."""
    import numpy as np
    from PIL import Image

    px = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    close = np.abs(px - np.array(rgb)).sum(axis=2) < tol
    return int(close.sum()), int(close.any(axis=0).sum())


BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1


def test_plot_one_run_and_several(runs):
    from PIL import Image

    root, a, b = runs
    assert (b / "metrics.png").stat().st_size > 20_000  # metrics.plot_at_end
    p = lathe("plot", str(a), cwd=root)
    assert p.returncode == 0, show(p)
    one = a / "metrics.png"
    assert Image.open(one).size[0] >= 1000 and one.stat().st_size > 20_000
    count, columns = _curve_pixels(one, BLUE)
    assert count > 2000 and columns > 400, (count, columns)  # curves across the panels, not a legend swatch
    assert _curve_pixels(one, ORANGE)[0] < 50  # one run: one colour

    both = root / "both.png"
    p = lathe("plot", str(a), str(b), "--output", str(both), "--metrics", "loss,lr", "--x", "tokens", cwd=root)
    assert p.returncode == 0, show(p)
    for colour in (BLUE, ORANGE):
        count, columns = _curve_pixels(both, colour)
        assert count > 500 and columns > 300, (colour, count, columns)
    svg = plot_runs([str(b)], root / "loss.svg", ["loss"])
    assert svg.read_text().lstrip().startswith("<?xml") and "<path" in svg.read_text()
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        plot_runs([str(root / "nope")], root / "x.png")
    with pytest.raises(ConfigError, match="none of mfu_typo was logged"):
        plot_runs([str(a)], root / "x.png", ["mfu_typo"])


def test_compare_same_run_passes_and_a_changed_learning_rate_fails(runs):
    root, a, b = runs
    p = lathe("compare", str(a), str(a), "--assert-equal", "--output", str(root / "same.png"), cwd=root)
    assert p.returncode == 0, show(p)
    assert "SAME" in p.stdout and (root / "same.png").stat().st_size > 10_000
    p = lathe("compare", str(a), str(b), cwd=root)
    assert p.returncode == 1, show(p)
    assert "DIFFERENT" in p.stdout and "first beyond rtol at step 2" in p.stdout  # step 1 ran before any update


def test_replay_reproduces_the_run(runs):
    root, a, _ = runs
    replay = root / "a-replay"
    p = lathe("replay", str(a), "--output", str(replay), cwd=root)
    assert p.returncode == 0, show(p)
    m = json.loads((replay / "run.json").read_text())
    original = json.loads((a / "run.json").read_text())
    assert m["replay_of"] == str(a.resolve()) and m["config_hash"] == original["config_hash"]
    p = lathe("compare", str(a), str(replay), "--assert-equal", cwd=root)
    assert p.returncode == 0, show(p)
    p = lathe("replay", str(a), "--output", str(replay), cwd=root)  # never into a used folder
    assert p.returncode == 2 and "--output" in p.stderr
