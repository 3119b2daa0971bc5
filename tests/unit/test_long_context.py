"""Document masking (block-causal attention over packed documents) and the long-context options.

- A packed batch gives the same per-token losses as running each document on its own.
- With ``causal`` a document's loss depends on the previous document's tokens; with
  ``block_causal`` its gradient with respect to them is exactly zero.
- The three block-causal kernels (per-segment SDPA, dense-mask SDPA under compile, FlexAttention)
  agree; FlexAttention is checked forward-only on CPU (torch refuses its backward on CPU).
- Bad combinations of context parallel and attention options fail before launch, in one line.
(The multi-process layouts with CP and block-causal attention are in tests/parallel/.)
"""

import pytest
import torch
import torch.nn.functional as F

from lathe.config import ALIASES, ConfigError, load_config, validate
from lathe.models.attention import (
    attention,
    block_mask,
    dense_block_causal,
    document_positions,
    model_inputs,
    per_document_attention,
)
from lathe.models.llama import ModelArgs, Transformer

SEQ = 32
# Two rows packed with documents; row 1 starts inside a document (as the stream's windows can).
DOC_IDS = torch.tensor([[0] * 5 + [1] * 12 + [2] * 15,
                        [0] * 20 + [1] * 3 + [2] + [3] * 8])


def model(**kw) -> Transformer:
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32, max_seq_len=SEQ,
                     rope_theta=500000, **kw)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    return m


def segments(ids_row):
    cuts = [0] + [i for i in range(1, len(ids_row)) if ids_row[i] != ids_row[i - 1]] + [len(ids_row)]
    return list(zip(cuts[:-1], cuts[1:]))


def per_token_losses(logits, labels):
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


@pytest.mark.parametrize("reset_positions", [True, False])
def test_packed_batch_equals_each_document_alone(reset_positions):
    m = model()
    torch.manual_seed(1)
    tokens = torch.randint(0, 97, (2, SEQ + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    kwargs = model_inputs(DOC_IDS, "block_causal", reset_positions)
    packed = per_token_losses(m(inputs, **kwargs), labels)
    for b in range(2):
        for s, e in segments(DOC_IDS[b].tolist()):
            alone = per_token_losses(m(inputs[b:b + 1, s:e]), labels[b:b + 1, s:e])
            # RoPE is relative: without the reset only float rounding differs (positions are larger)
            torch.testing.assert_close(packed[b:b + 1, s:e], alone, rtol=0, atol=1e-5 if reset_positions else 1e-4)
    # and the plain causal mask does not: later documents see earlier ones
    causal = per_token_losses(m(inputs), labels)
    assert (causal[0, 5:] - packed[0, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("mask,leaks", [("causal", True), ("block_causal", False)])
def test_gradient_of_a_document_wrt_the_previous_one(mask, leaks):
    m = model()
    torch.manual_seed(2)
    tokens = torch.randint(0, 97, (1, SEQ))
    ids = DOC_IDS[:1]
    embedded = {}

    def keep(module, inp, out):
        out.retain_grad()
        embedded["h"] = out

    m.tok_embeddings.register_forward_hook(keep)
    logits = m(tokens, **model_inputs(ids, mask, False))
    logits[0, 17:].sum().backward()  # the third document's outputs
    grad = embedded["h"].grad[0]
    assert grad[17:].abs().sum() > 0
    earlier = grad[:17].abs().max().item()
    if leaks:
        assert earlier > 1e-6
    else:
        assert earlier == 0.0  # exactly: no path from earlier documents


def random_qkv(bs=2, heads=4, seq=SEQ, dim=16, grad=False):
    torch.manual_seed(3)
    return [torch.randn(bs, heads, seq, dim, requires_grad=grad) for _ in range(3)]


def test_dense_mask_under_compile_equals_per_document_segments():
    q, k, v = random_qkv(grad=True)
    ref = per_document_attention(q, k, v, DOC_IDS)
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)  # takes the dense-mask path
    out = compiled(q, k, v, DOC_IDS)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5)
    direct = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_block_causal(DOC_IDS))
    torch.testing.assert_close(direct, ref, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_equals_per_document_segments():
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = random_qkv()
    mask = block_mask(DOC_IDS, compile=False)
    assert torch.equal(mask.to_dense().bool().any(), torch.tensor(True))
    with torch.no_grad():
        out = flex_attention(q, k, v, block_mask=mask)  # eager on CPU: forward only
        ref = per_document_attention(q, k, v, DOC_IDS)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_document_positions_restart_per_document():
    pos = document_positions(DOC_IDS)
    assert pos[0].tolist() == [*range(5), *range(12), *range(15)]
    assert pos[1].tolist() == [*range(20), *range(3), 0, *range(8)]
    assert model_inputs(DOC_IDS, "causal", False) == {}
    assert set(model_inputs(DOC_IDS, "block_causal", True)) == {"document_ids", "positions"}


# --- options --------------------------------------------------------------------------------

def test_torchtitan_cp_keys_map_to_lathe():
    cfg, _ = load_config(["--experimental.context_parallel_degree", "2",
                          "--experimental.context_parallel_rotate_method", "alltoall"])
    assert (cfg.parallelism.cp, cfg.parallelism.cp_rotate_method) == (2, "alltoall")
    assert ALIASES["experimental.context_parallel_rotate_method"] == "parallelism.cp_rotate_method"
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="must be one of allgather, alltoall"):
        load_config(["--parallelism.cp_rotate_method", "ring"])


@pytest.mark.parametrize("argv,world,message", [
    (["--parallelism.cp", "4", "--training.seq_len", "36"], 4,
     "training.seq_len=36: not divisible by 2 x parallelism.cp = 8: load balancing gives each rank a head and a "
     "tail chunk (use a multiple of 8 or --no-parallelism.cp_load_balance)"),
    (["--parallelism.cp", "3", "--training.seq_len", "32", "--no-parallelism.cp_load_balance"], 3,
     "not divisible by parallelism.cp = 3"),
    (["--parallelism.cp", "2", "--model.attention_mask", "block_causal"], 2,
     "model.attention_mask='block_causal': not supported with parallelism.cp=2"),
    (["--model.document_positions"], 1, "set model.attention_mask block_causal"),
    (["--parallelism.cp", "2", "--parallelism.tp", "4", "--training.seq_len", "36"], 8,
     "training.seq_len=36: not divisible by parallelism.tp=4 x cp=2"),
])
def test_long_context_errors_before_launch(argv, world, message):
    cfg, _ = load_config(argv)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=world)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cp_layouts_validate():
    for argv, world in ((["--parallelism.cp", "2"], 2), (["--parallelism.cp", "2", "--parallelism.dp_shard", "2"], 4),
                        (["--parallelism.cp", "2", "--parallelism.dp_replicate", "2", "--parallelism.tp", "2"], 8),
                        (["--parallelism.cp", "2", "--parallelism.pp", "2", "--parallelism.dp_shard", "1"], 4),
                        (["--model.attention_mask", "block_causal", "--model.document_positions"], 1)):
        validate(load_config(argv)[0], world_size=world)


def test_block_causal_training_and_validation_get_document_ids(tmp_path, monkeypatch):
    """The trainer feeds each training and validation batch's document ids to the model."""
    import lathe.models.llama as llama
    from lathe.trainer import train

    seen = []

    def spy(ids):
        seen.append((torch.is_grad_enabled(), int(ids.max())))
        return ids

    monkeypatch.setattr(llama, "document_mask", spy)
    cfg, _ = load_config(["--model.flavor", "tiny", "--training.seq_len", "128", "--training.steps", "2",
                          "--training.batch_size", "2", "--metrics.log_freq", "1", "--validation.enabled",
                          "--validation.steps", "1", "--model.attention_mask", "block_causal",
                          "--job.dump_folder", str(tmp_path)])
    losses = train(cfg).losses
    assert sorted(losses) == [1, 2] and all(3 < x < 20 for x in losses.values())
    training = [n for grad, n in seen if grad]
    validation = [n for grad, n in seen if not grad]
    assert len(training) == 2 and len(validation) == 1
    assert max(training) >= 1  # real windows span several documents
