"""Conversion between lathe checkpoints and Hugging Face safetensors folders (Llama).

``lathe convert lathe-to-hf CKPT OUT``: a lathe ``step-N`` folder -> ``model.safetensors`` +
``config.json`` that ``transformers.LlamaForCausalLM.from_pretrained(OUT)`` loads.
``lathe convert hf-to-lathe HF_DIR OUT``: a Hugging Face Llama folder -> a model-only lathe
checkpoint (``OUT/step-0``) to start a run from (``checkpoint.initial_load_path``).
Both run in one process on CPU and never unpickle anything.

Bad input is one ``ConfigError`` line naming the file and, where it applies, the tensor or entry,
and nothing is written: ``config.json`` is checked key by key; each safetensors header is parsed
and checked here (length, dtypes, shapes against the byte ranges) before the library reads it; the
tensors' names and shapes must be exactly those the config describes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lathe.checkpoint import integrity
from lathe.checkpoint.integrity import DamagedCheckpoint, SafeFileSystemReader
from lathe.checkpoint.manager import (FORMAT_VERSION, EXPORT_DTYPES, SafeLoadPlanner, _find_exception, _one_line,
                                      inspect_checkpoint)
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
    try:
        args = ModelArgs(**{k: v for k, v in meta["model_args"].items() if k in fields})
        args = args.with_(fused_qkv=False, fused_w13=False)  # checkpoints hold the unfused names
        with torch.device("meta"):
            model = Transformer(args)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError, OverflowError) as e:
        raise ConfigError("checkpoint", f"{checkpoint / 'train_state.json'}: its model_args describe no model lathe "
                          f"can build ({_one_line(e, 200)})", "convert an intact step-N folder") from None
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(checkpoint)), planner=SafeLoadPlanner(), no_dist=True)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        damage = _find_exception(e, DamagedCheckpoint)  # names the file and the entry
        problem = str(damage) if damage is not None else f"{checkpoint}: cannot be loaded ({_one_line(e)})"
        raise ConfigError("checkpoint", f"damaged checkpoint: {problem}", "convert an intact step-N folder") from None
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


def _positive_int(config: dict, key: str, source: str, default=None) -> int:
    value = config.get(key, default)
    if key not in config and default is None:
        raise ConfigError(source, f"missing key '{key}'", "a Hugging Face Llama config.json has it")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(source, f"{key} is {value!r}, not a positive whole number", "fix config.json")
    return value


def _positive_number(config: dict, key: str, source: str, default: float) -> float:
    value = config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ConfigError(source, f"{key} is {value!r}, not a positive number", "fix config.json")
    return float(value)


def args_from_hf_config(config: dict, source: str = "hf config") -> ModelArgs:
    """lathe's ModelArgs for a Hugging Face Llama ``config.json``; ConfigError (option ``source``)
    naming the first key that is missing, of the wrong type, or inconsistent."""
    if not isinstance(config, dict):
        raise ConfigError(source, f"holds a JSON {type(config).__name__}, not an object", "pass a Hugging Face "
                          "model folder's config.json")
    dim = _positive_int(config, "hidden_size", source)
    n_heads = _positive_int(config, "num_attention_heads", source)
    n_layers = _positive_int(config, "num_hidden_layers", source)
    vocab_size = _positive_int(config, "vocab_size", source)
    want = _positive_int(config, "intermediate_size", source)
    n_kv_heads = _positive_int(config, "num_key_value_heads", source, n_heads)
    max_seq_len = _positive_int(config, "max_position_embeddings", source, 2048)
    if dim % n_heads:
        raise ConfigError(source, f"hidden_size {dim} is not a multiple of num_attention_heads {n_heads}",
                          "not a Llama layout lathe supports")
    if config.get("head_dim", dim // n_heads) != dim // n_heads:
        raise ConfigError(source, "head_dim != hidden_size / num_attention_heads", "not a Llama layout lathe supports")
    if (dim // n_heads) % 2:
        raise ConfigError(source, f"head dimension {dim // n_heads} is odd (RoPE rotates pairs)",
                          "not a Llama layout lathe supports")
    if n_heads % n_kv_heads:
        raise ConfigError(source, f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads "
                          f"{n_kv_heads}", "not a Llama layout lathe supports")
    # transformers 5 writes RoPE settings as rope_parameters {rope_theta, rope_type, ...}; 4.x as
    # rope_theta and rope_scaling at the top level
    for key in ("rope_scaling", "rope_parameters"):
        if not isinstance(config.get(key) or {}, dict):
            raise ConfigError(source, f"{key} is {config[key]!r}, not an object or null", "fix config.json")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or rope
    rope_scaling = "llama3.1" if scaling.get("rope_type", scaling.get("type")) == "llama3" else "none"
    theta = _positive_number(config if "rope_theta" in config else rope, "rope_theta", source, 10000.0)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab_size,
                     norm_eps=_positive_number(config, "rms_norm_eps", source, 1e-5),
                     rope_theta=theta, rope_scaling=rope_scaling, max_seq_len=max_seq_len)
    # FFN size: lathe derives it from multiple_of / ffn_dim_multiplier; pick the pair that matches.
    for multiple_of in (256, 1024, 4096, 64, 32, 16, 8, 1):
        base = args.with_(multiple_of=multiple_of)
        if base.ffn_hidden_dim == want:
            return base
        hidden = int(2 * 4 * dim / 3)
        multiplier = want / hidden
        candidate = base.with_(ffn_dim_multiplier=round(multiplier, 4))
        if candidate.ffn_hidden_dim == want:
            return candidate
    raise ConfigError(source, f"intermediate_size {want} cannot be expressed as lathe's FFN size rule",
                      "convert a standard Llama configuration")


# safetensors dtypes: bytes per element, and whether lathe takes them as weights
_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
              "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_ST_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header, checked before the library reads it:
    the header length fits the file, every entry has a known floating-point dtype, a shape of
    non-negative integers and a byte range inside the file of exactly the shape's size.
    ConfigError naming the file (and tensor) otherwise."""
    fix = "re-download the file, or pass a folder of valid safetensors files"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            text = f.read(n) if len(head) == 8 and n <= min(size - 8, _ST_MAX_HEADER) else None
    except OSError as e:
        raise ConfigError(str(path), f"cannot be read: {e.strerror or e}", fix) from None
    if len(head) < 8:
        raise ConfigError(str(path), f"{size} bytes, too short for a safetensors file", fix)
    if text is None:
        raise ConfigError(str(path), f"header length {n:,} bytes, but the file holds {size:,} bytes "
                          f"(and safetensors allows at most {_ST_MAX_HEADER:,})", fix)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(str(path), f"header is not JSON ({type(e).__name__})", fix) from None
    if not isinstance(header, dict):
        raise ConfigError(str(path), "header is not a JSON object", fix)
    data_bytes = size - 8 - n
    shapes = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not isinstance(entry, dict):
            raise ConfigError(str(path), f"{where}: header entry is not an object", fix)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_DTYPES:
            raise ConfigError(str(path), f"{where}: unknown dtype {dtype!r}", fix)
        if dtype not in _ST_FLOATS:
            raise ConfigError(str(path), f"{where}: dtype {dtype}, expected floating-point weights", fix)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ConfigError(str(path), f"{where}: shape {shape!r} is not a list of sizes", fix)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ConfigError(str(path), f"{where}: data_offsets {offsets!r} lie outside the file's "
                              f"{data_bytes:,} data bytes", fix)
        need = math.prod(shape) * _ST_DTYPES[dtype]
        if need != offsets[1] - offsets[0]:
            raise ConfigError(str(path), f"{where}: shape {shape} of {dtype} needs {need:,} bytes, its data "
                              f"range holds {offsets[1] - offsets[0]:,}", fix)
        shapes[name] = shape
    return shapes


def _expected_hf_shapes(args: ModelArgs) -> dict[str, list[int]]:
    """The Hugging Face tensor names and shapes of the model ``args`` describes (meta tensors)."""
    with torch.device("meta"):
        model = Transformer(args.with_(fused_qkv=False, fused_w13=False))
    return {k: list(v.shape) for k, v in to_hf(model.state_dict(), args).items()}


def _check_tensors(found: dict[str, tuple[Path, list[int]]], expected: dict[str, list[int]], config: Path,
                   tied: bool = False) -> None:
    """The safetensors files hold exactly the tensors ``config.json`` describes: ConfigError naming
    the first one that is extra, missing, or of another shape. ``tied``: lm_head.weight may be
    absent (the embeddings serve as the output layer)."""
    fix = "use the config.json that belongs to these weights"
    if tied and "lm_head.weight" not in found:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    for name, (file, shape) in found.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a derived buffer some checkpoints carry
        if name not in expected:
            raise ConfigError(str(file), f"tensor {name!r} is not part of the Llama model {config} describes", fix)
        if shape != expected[name]:
            raise ConfigError(str(file), f"tensor {name!r} has shape {shape}, {config} implies "
                              f"{expected[name]}", fix)
    for name, shape in expected.items():
        if name not in found:
            raise ConfigError(str(config), f"describes tensor {name!r} of shape {shape}, which no .safetensors "
                              "file holds", fix)


def hf_to_lathe(hf_dir: Path, out: Path) -> Path:
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError("hf_dir", f"no config.json in {hf_dir}", "pass a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(str(config_file), f"unreadable ({_one_line(e, 200)})", "pass a Hugging Face model "
                          "folder's config.json") from None
    args = args_from_hf_config(config, str(config_file))
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError("hf_dir", f"no .safetensors files in {hf_dir}", "download the safetensors weights")
    found: dict[str, tuple[Path, list[int]]] = {}
    for f in files:
        for name, shape in safetensors_shapes(f).items():
            if name in found:
                raise ConfigError(str(f), f"tensor {name!r} is also in {found[name][0].name}",
                                  "remove the duplicate file")
            found[name] = (f, shape)
    tied = config.get("tie_word_embeddings") is True
    _check_tensors(found, _expected_hf_shapes(args), config_file, tied)
    hf_weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            hf_weights.update(load_file(str(f)))
        except Exception as e:  # what the header check above cannot see
            raise ConfigError(str(f), f"cannot be read ({_one_line(e, 200)})", "re-download the file") from None
    if tied and "lm_head.weight" not in hf_weights:  # lathe's output layer is its own: a copy of the embeddings
        hf_weights["lm_head.weight"] = hf_weights["model.embed_tokens.weight"].clone()
    weights = {k: v.float() for k, v in from_hf(hf_weights, args).items()}
    target = Path(out) / "step-0"
    try:
        dcp.save({"model": weights}, checkpoint_id=str(target), no_dist=True)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConfigError("output", f"cannot write {target}: {_one_line(e, 200)}", "check the folder, its "
                          "permissions and free space", str(out)) from None
    sidecar = {"format_version": FORMAT_VERSION, "contents": ["model"], "model": model_identity(args),
               "model_args": dataclasses.asdict(args), "source": str(hf_dir)}
    (target / "train_state.json").write_text(json.dumps(sidecar))
    integrity.write_manifest(target, world_size=0)
    logger.info("wrote %s from %s", target, hf_dir)
    return target
