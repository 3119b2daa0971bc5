"""Conversion between lathe checkpoints and Hugging Face safetensors folders (Llama).

``lathe convert lathe-to-hf CKPT OUT``: a lathe ``step-N`` folder -> ``model.safetensors`` +
``config.json`` that ``transformers.LlamaForCausalLM.from_pretrained(OUT)`` loads.
``lathe convert hf-to-lathe HF_DIR OUT``: a Hugging Face Llama folder -> a model-only lathe
checkpoint (``OUT/step-0``) to start a run from (``checkpoint.initial_load_path``).
Both run in one process on CPU and never unpickle anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lathe.checkpoint import integrity
from lathe.checkpoint.integrity import DamagedCheckpoint, SafeFileSystemReader
from lathe.checkpoint.manager import FORMAT_VERSION, EXPORT_DTYPES, SafeLoadPlanner, inspect_checkpoint
from lathe.errors import ConfigError
from lathe.models.hf_llama import from_hf, hf_config, to_hf
from lathe.models.llama import ModelArgs, Transformer

logger = logging.getLogger("lathe")


def model_identity(args: ModelArgs) -> dict:
    """What a checkpoint must match to load into a model: its shapes and RoPE."""
    return {"vocab_size": args.vocab_size, "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "n_kv_heads": args.kv_heads, "ffn_hidden_dim": args.ffn_hidden_dim, "rope_theta": args.rope_theta,
            "rope_scaling": args.rope_scaling, "norm_type": args.norm_type, "norm_eps": args.norm_eps}


def load_lathe_weights(checkpoint: Path) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    if not (checkpoint / "train_state.json").is_file() and not (checkpoint / ".metadata").is_file():
        raise ConfigError("checkpoint", f"{checkpoint} is not a lathe checkpoint (no train_state.json)",
                          "pass a step-N folder")
    try:
        meta = inspect_checkpoint(checkpoint, "full")
    except DamagedCheckpoint as e:
        raise ConfigError("checkpoint", f"damaged checkpoint: {e}", "convert an intact step-N folder") from None
    fields = {f.name for f in dataclasses.fields(ModelArgs)}
    args = ModelArgs(**{k: v for k, v in meta["model_args"].items() if k in fields})
    args = args.with_(fused_qkv=False, fused_w13=False)  # checkpoints hold the unfused names
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(checkpoint)), planner=SafeLoadPlanner(), no_dist=True)
    return args, state["model"]


def lathe_to_hf(checkpoint: Path, out: Path, dtype: str = "float32") -> Path:
    from safetensors.torch import save_file

    args, weights = load_lathe_weights(Path(checkpoint))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(EXPORT_DTYPES[dtype]).contiguous() for k, v in to_hf(weights, args).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(args)
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    logger.info("wrote %s (%d tensors, %s)", out, len(tensors), dtype)
    return out


def args_from_hf_config(config: dict) -> ModelArgs:
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ConfigError("hf config", "head_dim != hidden_size / num_attention_heads", "not a Llama layout lathe supports")
    scaling = config.get("rope_scaling") or {}
    rope_scaling = "llama3.1" if scaling.get("rope_type", scaling.get("type")) == "llama3" else "none"
    args = ModelArgs(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                     n_kv_heads=config.get("num_key_value_heads", n_heads), vocab_size=config["vocab_size"],
                     norm_eps=config.get("rms_norm_eps", 1e-5), rope_theta=float(config.get("rope_theta", 10000.0)),
                     rope_scaling=rope_scaling, max_seq_len=config.get("max_position_embeddings", 2048))
    # FFN size: lathe derives it from multiple_of / ffn_dim_multiplier; pick the pair that matches.
    want = config["intermediate_size"]
    for multiple_of in (256, 1024, 4096, 64, 32, 16, 8, 1):
        base = args.with_(multiple_of=multiple_of)
        if base.ffn_hidden_dim == want:
            return base
        hidden = int(2 * 4 * dim / 3)
        multiplier = want / hidden
        candidate = base.with_(ffn_dim_multiplier=round(multiplier, 4))
        if candidate.ffn_hidden_dim == want:
            return candidate
    raise ConfigError("hf config", f"intermediate_size {want} cannot be expressed as lathe's FFN size rule",
                      "convert a standard Llama configuration")


def hf_to_lathe(hf_dir: Path, out: Path) -> Path:
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ConfigError("hf_dir", f"no config.json in {hf_dir}", "pass a Hugging Face model folder")
    config = json.loads((hf_dir / "config.json").read_text())
    args = args_from_hf_config(config)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError("hf_dir", f"no .safetensors files in {hf_dir}", "download the safetensors weights")
    hf_weights: dict[str, torch.Tensor] = {}
    for f in files:
        hf_weights.update(load_file(str(f)))
    weights = {k: v.float() for k, v in from_hf(hf_weights, args).items()}
    target = Path(out) / "step-0"
    dcp.save({"model": weights}, checkpoint_id=str(target), no_dist=True)
    sidecar = {"format_version": FORMAT_VERSION, "contents": ["model"], "model": model_identity(args),
               "model_args": dataclasses.asdict(args), "source": str(hf_dir)}
    (target / "train_state.json").write_text(json.dumps(sidecar))
    integrity.write_manifest(target, world_size=0)
    logger.info("wrote %s from %s", target, hf_dir)
    return target
