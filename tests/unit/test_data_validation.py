"""Validation: held-out data, the same batches every run, the right mean loss, DP sharding and
reduction, and no effect on the training stream."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_data_fixtures import cfg_for, make_docs, write_jsonl

from lathe.config import validate
from lathe.data import build_train_data, build_validation_data
from lathe.data.tokenizer import load_tokenizer
from lathe.errors import ConfigError
from lathe.evaluation import Validator
from lathe.models.llama import ModelArgs, Transformer

SEQ, B = 16, 2


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("val")
    write_jsonl(d / "train.jsonl", make_docs(200, seed=1, prefix="TRAIN"))
    write_jsonl(d / "validation.jsonl", make_docs(40, seed=2, prefix="HELDOUT"))
    return d


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=SEQ)
    m = Transformer(args)
    m.init_weights()
    return m


def cfg(data_dir, *more):
    c = cfg_for("--training.dataset_path", str(data_dir), "--training.seq_len", str(SEQ),
                "--training.batch_size", str(B), "--validation.enabled", "--validation.steps", "3", *more)
    validate(c)
    return c


def mean_ce(model, batches) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for inputs, labels, *_ in batches:
            logits = model(inputs)
            total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum").item()
            n += labels.numel()
    return total / n


def test_validation_uses_held_out_data_and_is_repeatable(data_dir, tok, model):
    c = cfg(data_dir)
    batches = [b for b, _ in zip(build_validation_data(c, tok, 0, 1)(), range(3))]
    text = " ".join(tok.decode(b[0][i].tolist()) for b in batches for i in range(B))
    assert "HELDOUT" in text and "TRAIN" not in text

    v = Validator(c, tok, 0, 1, "cpu")
    model.train()
    first = v.run(model, contextlib.nullcontext)
    assert model.training  # mode restored
    assert first["val_tokens"] == 3 * B * SEQ
    assert first["val_loss"] == pytest.approx(mean_ce(model, batches), rel=1e-6)
    assert first["val_perplexity"] == pytest.approx(math.exp(first["val_loss"]))
    assert v.run(model, contextlib.nullcontext) == first  # the same batches every run
    model.eval()
    v.run(model)
    assert not model.training
    model.train()

    train = build_train_data(c, tok, 0, 1)
    train_loss = mean_ce(model, [next(train) for _ in range(3)])
    train.close()
    assert train_loss != pytest.approx(first["val_loss"], rel=1e-4)  # different data


def test_validation_does_not_perturb_the_training_stream(data_dir, tok, model):
    c = cfg(data_dir, "--training.data_workers", "1")
    ref, run = build_train_data(c, tok, 0, 1), build_train_data(c, tok, 0, 1)
    v = Validator(c, tok, 0, 1, "cpu")
    try:
        for _ in range(5):
            next(ref), next(run)
        before = json.dumps(run.state_dict())
        v.run(model, contextlib.nullcontext)
        assert json.dumps(run.state_dict()) == before
        for _ in range(5):
            a, b = next(ref), next(run)
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    finally:
        ref.close()
        run.close()


def test_validation_is_sharded_over_dp_ranks(data_dir, tok, model):
    one = Validator(cfg(data_dir, "--validation.batch_size", str(2 * B)), tok, 0, 1, "cpu").run(model)
    ranks = [Validator(cfg(data_dir), tok, r, 2, "cpu").run(model) for r in range(2)]
    assert sum(r["val_tokens"] for r in ranks) == one["val_tokens"]
    assert sum(r["val_loss"] for r in ranks) / 2 == pytest.approx(one["val_loss"], rel=1e-5)


def test_validation_all_reduces_over_the_dp_group(data_dir, tok, model, tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        c = cfg(data_dir)
        assert Validator(c, tok, 0, 1, "cpu", dp_group=dist.group.WORLD).run(model) == \
            Validator(c, tok, 0, 1, "cpu").run(model)
    finally:
        dist.destroy_process_group()


def test_whole_split_and_too_small_split(data_dir, tok, model, tmp_path):
    whole = Validator(cfg(data_dir, "--validation.steps", "-1"), tok, 0, 1, "cpu").run(model)
    n_tokens = sum(len(tok.encode(d, bos=True, eos=True)) for d in make_docs(40, seed=2, prefix="HELDOUT"))
    assert whole["val_tokens"] == (n_tokens // (B * (SEQ + 1))) * B * SEQ  # every full batch

    write_jsonl(tmp_path / "small" / "train.jsonl", make_docs(50))
    write_jsonl(tmp_path / "small" / "validation.jsonl", ["tiny"])
    with pytest.raises(ConfigError, match="validation data too small"):
        Validator(cfg(tmp_path / "small"), tok, 0, 1, "cpu")
    # A separate validation dataset.
    write_jsonl(tmp_path / "other.jsonl", make_docs(30, prefix="OTHER"))
    v = Validator(cfg(data_dir, "--validation.dataset_path", str(tmp_path / "other.jsonl")), tok, 0, 1, "cpu")
    assert v.run(model)["val_tokens"] == 3 * B * SEQ
    with pytest.raises(ConfigError, match="validation.dataset_path=.*no such file"):
        cfg(data_dir, "--validation.dataset_path", str(tmp_path / "missing.jsonl"))
