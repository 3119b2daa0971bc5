"""Non-finite and loss-spike policies (lathe/guard.py): the decision logic on its own, then short
single-process runs of the tiny model (the 2-process FSDP proof is tests/parallel/test_policies.py).

The NaN comes from the test hook LATHE_TEST_NAN ("batch=G,rank=R": rank R's loss on global batch G
becomes NaN). The reference for "the data skipped that window" is a run with
training.skip_batches=G, which drops batch G unread.
"""

import json
import logging
import math

import pytest
import torch

from lathe.checkpoint.manager import TrainState, _restore_train_state
from lathe.config import Training, load_config, validate
from lathe.errors import ConfigError
from lathe.guard import TEST_NAN_ENV, StepGuard, TrainingError, parse_batch_ranges
from lathe.trainer import train

BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--training.data_workers", "0"]


def run(folder, *extra, steps=6):
    cfg, _ = load_config([*BASE, "--training.steps", str(steps), "--job.dump_folder", str(folder), *extra])
    return train(cfg).losses


def records(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def sidecar(folder, step):
    return json.loads((folder / "checkpoint" / f"step-{step}" / "train_state.json").read_text())["train_state"]


# --- the decision, without training ---------------------------------------------------------------


def guard_for(**options):
    cfg = Training(**options)
    return StepGuard(cfg, torch.device("cpu"), TrainState(), windows_per_step=2)


def judge(guard, step, loss, grad_norm=1.0):
    return guard.judge(step, torch.tensor(float(loss)), torch.tensor(float(grad_norm)), (2 * step - 2, 2 * step))


def test_spike_detector_compares_with_the_median_of_a_full_window():
    g = guard_for(loss_spike_factor=2.0, loss_spike_window=3, on_loss_spike="skip")
    for step, loss in enumerate([9.0, 5.0, 4.0], start=1):  # filling the window: never a spike
        assert judge(g, step, loss).apply
    assert judge(g, 4, 9.5).apply  # 9.5 < 2 x median(9, 5, 4) = 10
    assert g.state.recent_losses == [5.0, 4.0, 9.5]
    v = judge(g, 5, 11.0)  # > 2 x median(5, 4, 9.5) = 10
    assert v.skipped and not v.apply
    assert g.counters == {"skipped_steps": 1, "nonfinite_steps": 0, "spike_steps": 1, "rollbacks": 0}
    assert g.state.skipped == [{"step": 5, "reason": "spike", "loss": 11.0, "windows": [8, 10]}]
    assert g.state.recent_losses == [5.0, 4.0, 9.5]  # a rejected loss does not enter the statistic


def test_nonfinite_policies_and_the_limit_on_bad_steps_in_a_row():
    g = guard_for(on_nonfinite="skip", max_consecutive_skips=2)
    assert judge(g, 1, 3.0).apply
    assert judge(g, 2, float("nan")).skipped
    assert judge(g, 3, 3.0, grad_norm=float("inf")).skipped  # a non-finite gradient norm counts too
    assert judge(g, 4, 3.0).apply  # a good step resets the run of bad ones
    assert judge(g, 5, float("inf")).skipped and judge(g, 6, float("nan")).skipped
    with pytest.raises(TrainingError, match="3 bad steps in a row"):
        judge(g, 7, float("nan"))

    stop = guard_for(loss_spike_factor=1.5, loss_spike_window=1, on_loss_spike="stop")
    judge(stop, 1, 2.0)
    with pytest.raises(TrainingError, match="loss spike: 5.0000 is above 1.5 x the median 2.0000"):
        judge(stop, 2, 5.0)
    rollback = guard_for(on_nonfinite="rollback")
    v = judge(rollback, 3, float("nan"))
    assert v.rollback and not v.apply and rollback.state.skip_windows == [[4, 6]]


def test_default_policy_defers_the_check_without_a_sync():
    g = guard_for()
    assert g.deferred is not None
    assert judge(g, 1, float("nan")).apply  # recorded, not yet read
    with pytest.raises(TrainingError, match="non-finite .* at step 1"):
        g.check()


def test_skip_batches_and_policy_options_are_validated():
    assert parse_batch_ranges(["1200-1300", "1500", 7]) == [(1200, 1300), (1500, 1500), (7, 7)]
    for bad in (["x"], ["0"], ["5-3"]):
        with pytest.raises(ConfigError, match="training.skip_batches"):
            parse_batch_ranges(bad)
    g = guard_for(skip_batches=["2-3"])
    assert g.state.skip_windows == [[2, 6]]  # batches 2 and 3, two windows each

    def check(*args):
        cfg, _ = load_config(list(args))
        validate(cfg)

    with pytest.raises(ConfigError, match="training.on_nonfinite='rollback': needs checkpoints"):
        check("--training.on_nonfinite", "rollback")
    with pytest.raises(ConfigError, match="training.loss_spike_factor=0.5: must be 0 .off. or a number above 1"):
        check("--training.loss_spike_factor", "0.5")
    check("--training.on_nonfinite", "rollback", "--checkpoint.enable_checkpoint")


def test_older_sidecars_without_the_new_fields_still_load():
    state = TrainState(counters={"rollbacks": 3}, skip_windows=[[1, 2]], wandb_run_id="abc")
    _restore_train_state(state, {"step": 7, "tokens_seen": 70, "loss_log": [[1, 2.0]]})
    assert (state.step, state.tokens_seen, state.loss_log) == (7, 70, [[1, 2.0]])
    assert state.counters == {} and state.skip_windows == [] and state.wandb_run_id == "" and state.skipped == []


# --- short runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Six steps whose data skips global batch 3 (windows 4-5): what a skip or rollback must match."""
    folder = tmp_path_factory.mktemp("reference")
    return run(folder, "--training.skip_batches", "3")


def test_skip_drops_the_update_and_matches_a_run_without_that_batch(tmp_path, monkeypatch, reference):
    monkeypatch.setenv(TEST_NAN_ENV, "batch=3,rank=0")
    losses = run(tmp_path, "--training.on_nonfinite", "skip")
    assert math.isnan(losses[3])
    # Step 3's update was dropped (no optimizer or LR step), so step s+1 here is step s there.
    assert [losses[s] for s in (1, 2)] == [reference[s] for s in (1, 2)]
    assert [losses[s + 1] for s in range(3, 6)] == [reference[s] for s in range(3, 6)]
    rows = [r for r in records(tmp_path) if "loss" in r]
    assert rows[-1]["skipped_steps"] == 1 and rows[-1]["nonfinite_steps"] == 1 and rows[1]["skipped_steps"] == 0
    skip = [r for r in records(tmp_path) if r.get("event") == "skip"]
    assert skip == [{**skip[0], "step": 3, "reason": "nonfinite", "windows": [4, 6]}]


def test_rollback_reloads_and_continues_past_the_bad_batch(tmp_path, monkeypatch, reference, caplog):
    monkeypatch.setenv(TEST_NAN_ENV, "batch=3,rank=0")
    with caplog.at_level(logging.INFO, logger="lathe"):
        losses = run(tmp_path, "--training.on_nonfinite", "rollback", "--checkpoint.enable_checkpoint",
                     "--checkpoint.interval", "2")
    assert "rolled back from step 3 to step 2" in caplog.text
    assert losses == reference  # reloaded step 2, then trained on batches 4, 5, ... like the reference
    state = sidecar(tmp_path, 6)
    assert state["counters"]["rollbacks"] == 1 and state["counters"]["nonfinite_steps"] == 1
    assert state["skip_windows"] == [[4, 6]]


def test_skip_windows_are_checkpointed_so_a_resume_drops_the_same_batch(tmp_path, reference):
    """The first run lists batch 3 to skip and stops at step 2; the resumed run is not told about
    it, and still drops batch 3: the window is part of the checkpointed train state."""
    run(tmp_path, "--training.skip_batches", "3", "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2",
        steps=2)
    assert sidecar(tmp_path, 2)["skip_windows"] == [[4, 6]]
    resumed = run(tmp_path, "--checkpoint.enable_checkpoint", "--checkpoint.interval", "2")
    assert sorted(resumed) == [3, 4, 5, 6]
    assert resumed == {s: reference[s] for s in resumed}


def test_a_loss_spike_is_detected_and_skipped(tmp_path, monkeypatch):
    import lathe.trainer as trainer

    real, calls = trainer.cross_entropy, []

    def spiky(logits, labels):  # the 5th step's loss is 10x what the model really has
        calls.append(1)
        return real(logits, labels) * (10.0 if len(calls) == 5 else 1.0)

    monkeypatch.setattr(trainer, "cross_entropy", spiky)
    losses = run(tmp_path, "--training.loss_spike_factor", "3", "--training.loss_spike_window", "3")
    assert losses[5] > 3 * max(losses[s] for s in (2, 3, 4))
    last = [r for r in records(tmp_path) if "loss" in r][-1]
    assert last["spike_steps"] == 1 and last["skipped_steps"] == 1 and last["nonfinite_steps"] == 0
    assert all(math.isfinite(losses[s]) and losses[s] < 10 for s in (6,))
