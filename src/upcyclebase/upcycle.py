"""The upcycling transform: add routed extra heads to every attention block of a model."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from torch import nn

from .attention import MoHAttentionMixin, is_moh_attention, moh_class
from .config import UpcycleConfig
from .families import find_attention_modules

logger = logging.getLogger(__name__)

# k_proj_extra and v_proj_extra exist only with kv_bank="separate"
EXTRA_MODULE_NAMES = ("q_proj_extra", "k_proj_extra", "v_proj_extra", "o_proj_extra", "moh_router")


def upcycle(
    model: nn.Module, config: UpcycleConfig | None = None, *, freeze_base: bool = False, **settings
) -> nn.Module:
    """Add a second bank of heads and a top-k router to every attention block, in place.

    Right after this call the model computes exactly what it computed before: routing is
    enabled with the identity shortcut on and top_k = H, unless ``config`` or ``settings``
    (fields of :class:`UpcycleConfig`) set otherwise.

    Args:
        model: a transformers model with attention blocks of a supported family (see
            :mod:`upcyclebase.families`).
        config: upcycling settings; keyword ``settings`` override its fields.
        freeze_base: leave only the extra banks and routers trainable.

    Returns:
        The same model object, upcycled.

    Raises:
        ValueError: if the model is already upcycled or has no supported attention block.
    """
    if any(is_moh_attention(module) for module in model.modules()):
        raise ValueError(f"{type(model).__name__} is already upcycled; load the base model again to upcycle it anew.")
    config = UpcycleConfig(**{**(config or UpcycleConfig()).to_dict(), **settings})

    for _, module in find_attention_modules(model):
        module.__class__ = moh_class(type(module))
        module._init_moh(config)
    model.upcycle_config = config
    if freeze_base:
        freeze_base_weights(model)

    blocks = len(list(moh_modules(model)))
    logger.info(
        "Upcycled %d attention blocks (router_init=%s, gate_mode=%s, kv_bank=%s)",
        blocks, config.router_init, config.gate_mode, config.kv_bank,
    )
    return model


def moh_modules(model: nn.Module) -> Iterator[MoHAttentionMixin]:
    for module in model.modules():
        if is_moh_attention(module):
            yield module


def _require_upcycled(model: nn.Module) -> list[MoHAttentionMixin]:
    modules = list(moh_modules(model))
    if not modules:
        raise ValueError(f"{type(model).__name__} is not upcycled; call upcyclebase.upcycle(model) first.")
    return modules


def set_moh(
    model: nn.Module, enabled: bool | None = None, identity_shortcut: bool | None = None, top_k: int | None = None
) -> None:
    """Set routing on every upcycled attention block of ``model`` (see ``MoHAttentionMixin.set_moh``).

    Arguments left as None keep their current value. top_k is checked on every block
    before any block changes, so a bad value leaves the model as it was.
    """
    modules = _require_upcycled(model)
    if top_k is not None:
        for module in modules:
            module.check_top_k(top_k)
    for module in modules:
        module.set_moh(enabled=enabled, identity_shortcut=identity_shortcut, top_k=top_k)

    config = getattr(model, "upcycle_config", None)
    if config is not None:
        config.enabled = modules[0].moh_enabled
        config.identity_shortcut = modules[0].moh_identity_shortcut
        config.top_k = modules[0].moh_top_k


def extra_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters added by upcycling, by their qualified names in ``model``."""
    params = {}
    for prefix, module in model.named_modules():
        if is_moh_attention(module):
            for child in EXTRA_MODULE_NAMES:
                if not hasattr(module, child):
                    continue
                for name, param in getattr(module, child).named_parameters():
                    params[f"{prefix}.{child}.{name}"] = param
    return params


def freeze_base_weights(model: nn.Module) -> None:
    """Freeze every parameter except the extra banks and routers."""
    _require_upcycled(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in extra_parameters(model).values():
        param.requires_grad_(True)


def reset_router(model: nn.Module, router_init: str) -> None:
    """Re-initialise every router (weight zero, bias selecting H heads) with ``router_init``."""
    from .router import init_router_bias

    config = model.upcycle_config
    config.router_init = router_init
    UpcycleConfig(**config.to_dict())  # validates router_init
    for module in _require_upcycled(model):
        init_router_bias(module.moh_router, module.moh_num_heads // 2, router_init, config.router_bias, module.layer_idx)
