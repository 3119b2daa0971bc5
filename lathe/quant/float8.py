"""Float8 training with torchao: a model converter, applied to the meta model before parallelization.

What float8 training does: each selected ``nn.Linear`` becomes torchao's ``Float8Linear``. Its
weights stay in high precision (the master copy the optimizer updates); on every forward and
backward the matmul inputs are scaled into the float8 range, cast to float8 (e4m3 for inputs and
weights, e5m2 for gradients) and multiplied with ``torch._scaled_mm`` (float8 tensor cores on
H100-class GPUs, about twice the bf16 throughput). Scales are computed from the current values
("dynamic" scaling) per tensor (recipe ``tensorwise``) or per row (``rowwise``, more accurate,
slower; ``rowwise_with_gw_hp`` also keeps the weight-gradient matmul in high precision).

The model knows nothing of this. The trainer calls, in this order (torchtitan's documented order):

1. ``convert(model, cfg, tp)`` on the meta-device model: swap the linears the filter selects;
2. tensor parallel with ``tp_styles(cfg, device_type)``: with the tensorwise recipe on GPUs, the
   float8 column/row-wise styles all-gather activations in float8 (half the bytes of bf16);
3. activation checkpointing, torch.compile (float8 casts fuse into neighbouring kernels);
4. FSDP: with ``float8.enable_fsdp_float8_all_gather`` (tensorwise only), FSDP all-gathers the
   weights already cast to float8; ``precompute_float8_dynamic_scale_for_fsdp`` then computes every
   weight's scale in one all-reduce right after the optimizer step (``register_precompute``)
   instead of one small all-reduce per weight during the next forward.

The filter (``module_filter``) keeps in high precision: the layers ``float8.filter_fqns`` names
(default: the output projection, whose logits are sensitive to rounding), and every linear with a
dimension not divisible by 16 (a ``_scaled_mm`` requirement), counting the tensor-parallel shard.

Hardware: float8 matmuls need CUDA compute capability 8.9 or newer (L4, L40S, H100, H200, B200).
Older GPUs (A100, A40, ...) are refused with the GPU's name. On CPU, torch's ``_scaled_mm`` runs
through oneDNN (slower than float32 matmuls, but numerically the same recipe), so float8 numerics
are tested on CPU.

MFU: lathe's MFU divides by the device's bf16 dense peak (the datasheet number), also under float8,
as torchtitan does; a float8 run's MFU is therefore comparable with a bf16 run's and can exceed
what the bf16 peak alone would allow. The run says so in its log (``mfu_note``).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch
from torch import nn

from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

MIN_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9), Hopper (9.0), Blackwell (10.x)
ALIGNMENT = 16  # _scaled_mm needs both matrix dimensions divisible by 16
INSTALL_HINT = "pip install 'lathe[float8]' (torchao)"


def _torchao_float8():
    # torchao's import logs a warning for each of its compiled extensions it cannot load (CUDA
    # kernels for other formats, e.g. mxfp8; absent on CPU builds). float8 training uses none of them.
    ao_logger = logging.getLogger("torchao")
    level = ao_logger.level
    ao_logger.setLevel(logging.ERROR)
    try:
        import torchao.float8 as ao_float8
    except ImportError:
        raise ConfigError("float8.enable_float8_linear", "needs the torchao package, which is not installed",
                          INSTALL_HINT, True) from None
    finally:
        ao_logger.setLevel(level)
    return ao_float8


def check_config(cfg, cuda_available: bool) -> None:
    """Everything about float8 that can be checked before a process group exists."""
    f = cfg.float8
    if not f.enable_float8_linear:
        return
    for name in ("scaling_type_input", "scaling_type_weight", "scaling_type_grad_output"):
        if getattr(f, name) != "dynamic":
            raise ConfigError(f"float8.{name}", "delayed scaling was removed from torchao (and never synced its "
                              "amax history in torchtitan 2024)", "use dynamic (the default)", getattr(f, name))
    if f.enable_fsdp_float8_all_gather and f.recipe_name != "tensorwise":
        raise ConfigError("float8.enable_fsdp_float8_all_gather", f"works with the tensorwise recipe only, "
                          f"not {f.recipe_name}", "set float8.recipe_name tensorwise, or turn it off", True)
    _torchao_float8()
    if cuda_available and cfg.training.device != "cpu":
        check_hardware(int(os.environ.get("LOCAL_RANK", 0)))


def check_hardware(device_index: int = 0) -> None:
    """Refuse a GPU without float8 tensor cores, naming it."""
    capability = torch.cuda.get_device_capability(device_index)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device_index)
        raise ConfigError("float8.enable_float8_linear", f"needs a GPU with CUDA compute capability 8.9 or newer "
                          f"(L4, L40S, H100, H200, B200); this {name} has {capability[0]}.{capability[1]}",
                          "train in bf16 on this GPU: remove float8.enable_float8_linear", True)


def _name_matches(fqn: str, entry: str) -> bool:
    """``entry`` is the whole name or a run of its dotted parts: "w2" and "layers.0" match
    "layers.0.feed_forward.w2"; "output" does not match "output_proj"."""
    return f".{entry}." in f".{fqn}."


def module_filter(filter_fqns: list[str], tp: int = 1) -> Callable[[nn.Module, str], bool]:
    """Which linears become float8 (True) and which stay in high precision (False)."""

    def convert_this(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(_name_matches(fqn, entry) for entry in filter_fqns):
            return False
        out_features, in_features = module.weight.shape
        # tensor parallel splits one of the two dimensions tp ways; each shard must still align
        return out_features % (ALIGNMENT * tp) == 0 and in_features % (ALIGNMENT * tp) == 0

    return convert_this


def linear_config(cfg, fsdp_enabled: bool):
    """torchao's Float8LinearConfig for the configured recipe."""
    ao = _torchao_float8()
    f = cfg.float8
    if f.recipe_name == "tensorwise":
        # float8 all-gather only where FSDP actually shards (torchtitan: dp_shard > 1)
        return ao.Float8LinearConfig(enable_fsdp_float8_all_gather=f.enable_fsdp_float8_all_gather and fsdp_enabled)
    return ao.Float8LinearConfig.from_recipe_name(f.recipe_name)


def convert(model: nn.Module, cfg, tp: int = 1, fsdp_enabled: bool = False) -> nn.Module:
    """Swap the selected ``nn.Linear`` layers of ``model`` (on any device, meta included) for
    ``Float8Linear``; a no-op unless ``float8.enable_float8_linear``."""
    if not cfg.float8.enable_float8_linear:
        return model
    ao = _torchao_float8()
    config = linear_config(cfg, fsdp_enabled)
    keep = module_filter(cfg.float8.filter_fqns, tp)
    ao.convert_to_float8_training(model, module_filter_fn=keep, config=config)
    converted = [n for n, m in model.named_modules() if isinstance(m, ao.float8_linear.Float8Linear)]
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    logger.info("float8 (%s): %d linear layers converted, %d kept in high precision%s; float8 all-gather %s",
                cfg.float8.recipe_name, len(converted), len(kept), f" ({', '.join(kept)})" if len(kept) <= 8 else "",
                "on" if config.enable_fsdp_float8_all_gather else "off")
    logger.info(mfu_note())
    return model


def mfu_note() -> str:
    return ("float8: MFU is reported against the device's bf16 dense peak, not its float8 peak, so it stays "
            "comparable with bf16 runs")


def tp_styles(cfg, device_type: str) -> dict | None:
    """Tensor-parallel styles for float8 block linears (lathe.parallel.tensor): with the tensorwise
    recipe, activations are all-gathered in float8. None (plain styles: the float8 linears cast
    after a high-precision all-gather, with the same tensorwise scale, so the same numbers) for the
    row-wise recipes, which torchao all-gathers in high precision, and on CPU, where gloo has no
    float8 type to all-gather."""
    if not cfg.float8.enable_float8_linear or cfg.float8.recipe_name != "tensorwise":
        return None
    if device_type != "cuda":
        logger.info("float8 + tensor parallel on %s: activations are all-gathered in high precision (gloo cannot "
                    "send float8); the matmuls are float8", device_type)
        return None
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    return {"colwise": Float8ColwiseParallel, "rowwise": Float8RowwiseParallel,
            "prepare_input": PrepareFloat8ModuleInput, "is_float8": lambda m: isinstance(m, Float8Linear)}


def register_precompute(optimizers, model_parts: list[nn.Module], cfg, fsdp_enabled: bool) -> None:
    """After each optimizer step, compute all float8 weight scales in one all-reduce per part."""
    f = cfg.float8
    if not (f.enable_float8_linear and f.recipe_name == "tensorwise" and f.enable_fsdp_float8_all_gather
            and f.precompute_float8_dynamic_scale_for_fsdp and fsdp_enabled):
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    def precompute() -> None:
        for part in model_parts:
            precompute_float8_dynamic_scale_for_fsdp(part)

    optimizers.register_step_post_hook(precompute)
    logger.info("float8: weight scales precomputed after each optimizer step (one all-reduce)")
