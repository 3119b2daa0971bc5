"""The Llama model: shapes and parameter counts of every flavor, init, FLOPs, and logits equal to
Hugging Face transformers' LlamaForCausalLM on the same weights."""

import math

import pytest
import torch

from lathe.models import MODELS
from lathe.models.hf_llama import from_hf, hf_config, to_hf
from lathe.models.llama import ModelArgs, Transformer, apply_rope, flops_per_token, num_params, rope_frequencies, rope_tables

# (family, flavor, vocab, FFN hidden, parameter count as printed in the facts file, its precision)
FACTS = [
    ("llama2", "debugmodel", 32000, 768, 23e6, 1e6),
    ("llama2", "271M", 32000, 2816, 271e6, 1e6),
    ("llama2", "1B", 32000, 5632, 1.06e9, 0.01e9),
    ("llama2", "7B", 32000, 11008, 6.74e9, 0.01e9),
    ("llama2", "13B", 32000, 13824, 13.0e9, 0.1e9),
    ("llama2", "26B", 32000, 13824, 25.7e9, 0.1e9),
    ("llama2", "70B", 32000, 28672, 69.0e9, 0.1e9),
    ("llama3", "debugmodel", 2256, 768, 8e6, 1e6),
    ("llama3", "8B", 128256, 14336, 8.03e9, 0.01e9),
    ("llama3", "70B", 128256, 28672, 70.6e9, 0.1e9),
    ("llama3", "405B", 128256, 53248, 405.9e9, 0.1e9),
]


def expected_params(a: ModelArgs) -> int:
    """Count from first principles, independently of the modules."""
    hd = a.dim // a.n_heads
    attn = a.dim * a.n_heads * hd * 2 + a.dim * a.kv_heads * hd * 2
    ffn = 3 * a.dim * a.ffn_hidden_dim
    return 2 * a.vocab_size * a.dim + a.n_layers * (attn + ffn + 2 * a.dim) + a.dim


@pytest.mark.parametrize("family,flavor,vocab,ffn,approx,precision", FACTS)
def test_flavor_parameter_count_on_meta(family, flavor, vocab, ffn, approx, precision):
    args = MODELS[family].flavors[flavor].with_(vocab_size=vocab, max_seq_len=16)
    assert args.ffn_hidden_dim == ffn
    with torch.device("meta"):
        model = Transformer(args)
    n = num_params(model)
    assert n == expected_params(args)
    assert abs(n - approx) <= precision / 2, f"{family} {flavor}: {n:,} vs {approx:,}"
    assert all(p.is_meta for p in model.parameters())


def tiny(**kw) -> ModelArgs:
    base = dict(dim=64, n_layers=2, n_heads=4, vocab_size=97, multiple_of=32, max_seq_len=32)
    base.update(kw)
    return ModelArgs(**base)


def test_meta_init_then_materialize_matches_eager_init():
    args = tiny()
    torch.manual_seed(0)
    eager = Transformer(args)
    eager.init_weights()
    with torch.device("meta"):
        meta = Transformer(args)
    meta.to_empty(device="cpu")
    torch.manual_seed(0)
    Transformer(args)  # consume the same RNG as the eager construction did
    meta.init_weights(buffer_device="cpu")
    for (n, a), (_, b) in zip(eager.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(eager.rope_cos, meta.rope_cos)
    assert "rope_cos" not in eager.state_dict()  # derived buffers are not checkpointed


def test_init_scheme():
    args = tiny(dim=256, n_layers=4, n_heads=4, vocab_size=2000)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    assert m.tok_embeddings.weight.std().item() == pytest.approx(1.0, rel=0.02)
    out_std = args.dim ** -0.5
    assert m.output.weight.abs().max().item() <= 3 * out_std + 1e-6
    assert torch.equal(m.layers["0"].attention_norm.weight, torch.ones(args.dim))
    # output projections shrink with depth: std 0.02/sqrt(2*(layer+1)) (truncated at +-2 absolute)
    s0 = m.layers["0"].attention.wo.weight.std().item()
    s3 = m.layers["3"].attention.wo.weight.std().item()
    assert s0 == pytest.approx(0.02 / math.sqrt(2), rel=0.05)
    assert s3 == pytest.approx(0.02 / math.sqrt(8), rel=0.05)


def test_flops_per_token_formula():
    args = MODELS["llama3"].flavors["8B"].with_(vocab_size=128256)
    with torch.device("meta"):
        m = Transformer(args.with_(max_seq_len=16))
    n = num_params(m, exclude_embedding=True)
    assert n == num_params(m) - 128256 * 4096
    assert flops_per_token(args, n, 8192) == 6 * n + 12 * 32 * 32 * 128 * 8192


def test_rope_takes_half_precision_tables():
    """FSDP casts the cos/sin tables a block is handed to its compute dtype (bf16): the rotation
    still runs, in float32, on the rounded tables (per-token rows, as context parallel passes, too)."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=32, max_seq_len=16)
    cos, sin = rope_tables(args, torch.device("cpu"))
    x = torch.randn(2, 16, 4, 16)
    half = apply_rope(x, cos.bfloat16(), sin.bfloat16())
    torch.testing.assert_close(half, apply_rope(x, cos.bfloat16().float(), sin.bfloat16().float()), rtol=0, atol=0)
    positions = torch.arange(16).flip(0).expand(2, 16)
    rows = apply_rope(x, cos.bfloat16()[positions], sin.bfloat16()[positions])
    assert rows.dtype == x.dtype and torch.isfinite(rows).all()


def test_rope_llama31_scaling_keeps_high_and_scales_low_frequencies():
    plain = rope_frequencies(128, 500000.0)
    scaled = rope_frequencies(128, 500000.0, "llama3.1")
    assert torch.allclose(scaled[:8], plain[:8])  # short wavelengths kept
    assert torch.allclose(scaled[-4:], plain[-4:] / 8)  # long wavelengths stretched 8x


def test_norm_variants_and_gqa_forward_shapes():
    for norm in ("rmsnorm", "layernorm", "np_layernorm"):
        m = Transformer(tiny(norm_type=norm, n_kv_heads=2))
        m.init_weights()
        out = m(torch.randint(0, 97, (2, 16)))
        assert out.shape == (2, 16, 97) and out.dtype == torch.float32


# --- Hugging Face parity -----------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _hf_model(args: ModelArgs):
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(args).items()
                                      if k not in ("architectures", "model_type", "torch_dtype")})
    cfg._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kv_heads,theta", [(None, 10000.0), (2, 10000.0), (None, 500000.0), (1, 500000.0)])
def test_logits_match_hugging_face(kv_heads, theta):
    args = tiny(n_kv_heads=kv_heads, rope_theta=theta)
    torch.manual_seed(1)
    ours = Transformer(args)
    ours.init_weights()
    theirs = _hf_model(args)
    hf_sd = to_hf(ours.state_dict(), args)
    missing, unexpected = theirs.load_state_dict(hf_sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    tokens = torch.randint(0, args.vocab_size, (2, 32))
    with torch.no_grad():
        a = ours(tokens)
        b = theirs(tokens).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_weight_mapping_round_trips_and_is_not_identity():
    args = tiny(n_kv_heads=2)
    m = Transformer(args)
    m.init_weights()
    sd = m.state_dict()
    hf = to_hf(sd, args)
    wq = hf["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(wq, sd["layers.0.attention.wq.weight"])  # rows really are permuted
    back = from_hf(hf, args)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_hugging_face_weights_load_into_lathe():
    """The other direction: a random HF model's weights, converted, give the same logits."""
    args = tiny(n_kv_heads=2, rope_theta=500000.0)
    torch.manual_seed(2)
    theirs = _hf_model(args)
    ours = Transformer(args)
    ours.load_state_dict(from_hf(theirs.state_dict(), args))
    tokens = torch.randint(0, args.vocab_size, (1, 32))
    with torch.no_grad():
        assert torch.allclose(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)
