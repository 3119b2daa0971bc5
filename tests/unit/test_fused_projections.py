"""Fused QKV and w1/w3 projections: the same function, gradients and checkpoints as the unfused
layout. (Under tensor parallelism: tests/parallel/test_parity.py, cases *_fused.)"""

import json

import pytest
import torch
import torch.nn.functional as F

from lathe.checkpoint.hf import lathe_to_hf, load_lathe_weights
from lathe.config import load_config
from lathe.models.llama import (
    ModelArgs,
    Transformer,
    fuse_state_dict,
    join_qkv,
    split_qkv,
    unfuse_state_dict,
    w13_block,
)
from lathe.trainer import train


def tiny(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=32)
    base.update(kw)
    return ModelArgs(**base)


def pair(**kw):
    args = tiny(**kw)
    torch.manual_seed(0)
    plain = Transformer(args)
    plain.init_weights()
    torch.manual_seed(0)
    fused = Transformer(args.with_(fused_qkv=True, fused_w13=True))
    fused.init_weights()
    return args, plain, fused


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_fused_init_logits_and_gradients_equal_unfused(kv_heads):
    args, plain, fused = pair(n_kv_heads=kv_heads)
    assert {"layers.0.attention.wqkv.weight", "layers.0.feed_forward.w13.weight"} <= set(fused.state_dict())
    # same seed -> the same weights, once mapped to the unfused names
    mapped = unfuse_state_dict(fused.state_dict(), args)
    assert mapped.keys() == plain.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in plain.state_dict().items())
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    labels = torch.randint(0, args.vocab_size, (2, 32))
    losses = []
    for model in (plain, fused):
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(0, 1))
        loss.backward()
        losses.append((logits.detach(), loss.item()))
    torch.testing.assert_close(losses[0][0], losses[1][0], atol=1e-5, rtol=1e-5)
    grads_fused = unfuse_state_dict({n: p.grad for n, p in fused.named_parameters()}, args)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(grads_fused[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_state_dict_mapping_round_trips_and_keeps_tp_groups_together():
    args, plain, fused = pair(n_heads=8, n_kv_heads=2)
    back = fuse_state_dict(plain.state_dict(), fused.args)
    assert back.keys() == fused.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in fused.state_dict().items())
    # an even split of wqkv's rows over 2 ranks holds exactly the heads the unfused split gives each rank
    wqkv = fused.layers["0"].attention.wqkv.weight
    for rank, rows in enumerate(wqkv.chunk(2)):
        q, k, v = split_qkv(rows, args.n_rep, args.head_dim)
        sd = plain.state_dict()
        assert torch.equal(q, sd["layers.0.attention.wq.weight"].chunk(2)[rank])
        assert torch.equal(k, sd["layers.0.attention.wk.weight"].chunk(2)[rank])
        assert torch.equal(v, sd["layers.0.attention.wv.weight"].chunk(2)[rank])
    # w13 alternates blocks: rows [0, block) are w1's first rows, [block, 2 block) w3's
    block = w13_block(args.ffn_hidden_dim)
    w13 = fused.layers["1"].feed_forward.w13.weight
    assert torch.equal(w13[:block], plain.layers["1"].feed_forward.w1.weight[:block])
    assert torch.equal(w13[block:2 * block], plain.layers["1"].feed_forward.w3.weight[:block])
    # optimizer-style flattened keys (suffixes) and non-tensor values are mapped too
    flat = {"state.layers.0.attention.wqkv.weight.exp_avg": wqkv, "param_groups.layers.0.attention.wqkv.weight.lr": 0.1}
    out = unfuse_state_dict(flat, args)
    assert set(out) == {f"state.layers.0.attention.w{x}.weight.exp_avg" for x in "qkv"} | {
        f"param_groups.layers.0.attention.w{x}.weight.lr" for x in "qkv"}
    assert torch.equal(join_qkv(*(out[f"state.layers.0.attention.w{x}.weight.exp_avg"] for x in "qkv"),
                                args.n_rep, args.head_dim), wqkv)


BASE = ["--model.flavor", "tiny", "--training.seq_len", "32", "--training.batch_size", "2", "--optimizer.lr", "1e-3",
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1", "--checkpoint.enable_checkpoint",
        "--checkpoint.interval", "2"]


def run(folder, steps, *extra):
    cfg, _ = load_config([*BASE, "--training.steps", str(steps), "--job.dump_folder", str(folder), *extra])
    return train(cfg).losses


def test_checkpoints_are_interchangeable_between_fused_and_unfused(tmp_path):
    """A fused run's checkpoint (weights and Adam moments) resumes unfused, and the reverse; both
    hold the unfused names and convert to Hugging Face."""
    fused = ["--model.fused_qkv", "--model.fused_w13"]
    straight = run(tmp_path / "a", 4, *fused)
    # resume the fused run's step-2 checkpoint with the unfused layout: steps 3-4 continue the same run
    (tmp_path / "b" / "checkpoint").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint" / "step-2", tmp_path / "b" / "checkpoint" / "step-2")
    resumed = run(tmp_path / "b", 4)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5)
    # and back: the unfused run's step-4 checkpoint into a fused model, model weights equal
    args, weights = load_lathe_weights(tmp_path / "b" / "checkpoint" / "step-4")
    assert "layers.0.attention.wq.weight" in weights and "layers.0.feed_forward.w1.weight" in weights
    sidecar = json.loads((tmp_path / "a" / "checkpoint" / "step-4" / "train_state.json").read_text())
    assert sidecar["model_args"]["fused_qkv"] is True
    _, fused_weights = load_lathe_weights(tmp_path / "a" / "checkpoint" / "step-4")
    assert fused_weights.keys() == weights.keys()  # a fused run's checkpoint holds the unfused names
    out = lathe_to_hf(tmp_path / "a" / "checkpoint" / "step-4", tmp_path / "hf")
    assert (out / "model.safetensors").is_file()
