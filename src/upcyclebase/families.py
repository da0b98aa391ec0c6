"""Attention classes that can be upcycled: one short description per transformers model family.

Every family listed here lays out its attention block the same way, and routed attention
relies on that layout:

- four ``nn.Linear`` projections ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, with the
  heads side by side (``num_heads * head_dim`` features, head h at ``h * head_dim``);
- grouped K/V as transformers' ``repeat_kv`` lays it out: query head h reads key/value
  head ``h // G`` with G = H / N;
- RoPE applied by the modeling module's ``apply_rotary_pos_emb(q, k, cos, sin)`` to
  (B, heads, T, D) tensors, with cos and sin passed in as ``position_embeddings``;
- the attention function looked up in ``ALL_ATTENTION_FUNCTIONS`` by the config's
  ``_attn_implementation``, else the modeling module's ``eager_attention_forward``.

What differs between families is in :class:`AttentionFamily`: RMS norms on queries and
keys (Gemma-3, Qwen3) or none, and the keyword arguments that the stock ``forward`` passes
to the attention function (sliding window, Gemma-2's logit soft-capping). A family whose
block fuses projections (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``) needs code, not a
description.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from torch import nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _no_kwargs(module: nn.Module) -> dict[str, Any]:
    return {}


def _layer_sliding_window(module: nn.Module) -> dict[str, Any]:
    """The block's own window: set on sliding layers, None on full-attention layers."""
    return {"sliding_window": module.sliding_window}


def _config_sliding_window(module: nn.Module) -> dict[str, Any]:
    """Mistral passes the config's window (None for no window) on every layer."""
    return {"sliding_window": getattr(module.config, "sliding_window", None)}


def _sliding_window_and_softcap(module: nn.Module) -> dict[str, Any]:
    """Gemma-2 also caps attention logits: ``softcap * tanh(logits / softcap)``."""
    return {"sliding_window": module.sliding_window, "softcap": module.attn_logit_softcapping}


@dataclass(frozen=True)
class AttentionFamily:
    """Description of one family's attention block, as routed attention needs it."""

    name: str
    module: str  # the transformers modeling module that defines the class and its functions
    attention_class: str
    qk_norm: bool  # q_norm and k_norm (RMS norm over head_dim) run on queries and keys before RoPE
    attention_kwargs: Callable[[nn.Module], dict[str, Any]]  # extra keyword arguments of the attention call
    model_type: str  # ``model_type`` of the family's text config, which preflight checks before loading weights
    rotary_function: str = "apply_rotary_pos_emb"
    eager_function: str = "eager_attention_forward"

    def _modeling_module(self):
        return sys.modules.get(self.module) or import_module(self.module)

    def apply_rotary(self, queries, keys, cos, sin):
        return getattr(self._modeling_module(), self.rotary_function)(queries, keys, cos, sin)

    def eager_attention(self) -> Callable:
        return getattr(self._modeling_module(), self.eager_function)


FAMILIES = (
    AttentionFamily("gemma3", "transformers.models.gemma3.modeling_gemma3", "Gemma3Attention",
                    qk_norm=True, attention_kwargs=_layer_sliding_window, model_type="gemma3_text"),
    AttentionFamily("gemma2", "transformers.models.gemma2.modeling_gemma2", "Gemma2Attention",
                    qk_norm=False, attention_kwargs=_sliding_window_and_softcap, model_type="gemma2"),
    # Llama 2 and 3, SmolLM and SmolLM2
    AttentionFamily("llama", "transformers.models.llama.modeling_llama", "LlamaAttention",
                    qk_norm=False, attention_kwargs=_no_kwargs, model_type="llama"),
    # Qwen2 and Qwen2.5
    AttentionFamily("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2Attention",
                    qk_norm=False, attention_kwargs=_layer_sliding_window, model_type="qwen2"),
    AttentionFamily("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3Attention",
                    qk_norm=True, attention_kwargs=_layer_sliding_window, model_type="qwen3"),
    AttentionFamily("mistral", "transformers.models.mistral.modeling_mistral", "MistralAttention",
                    qk_norm=False, attention_kwargs=_config_sliding_window, model_type="mistral"),
)
_BY_CLASS = {(family.module, family.attention_class): family for family in FAMILIES}


def supported_families_text() -> str:
    return ", ".join(f"{family.name} ({family.attention_class})" for family in FAMILIES)


def family_of_class(attention_cls: type) -> AttentionFamily | None:
    """The family of a transformers attention class or of a subclass of one; None if unsupported.

    Classes are matched by module and name, so checking a model imports no other family's code.
    """
    for cls in attention_cls.__mro__:
        family = _BY_CLASS.get((cls.__module__, cls.__name__))
        if family is not None:
            return family
    return None


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every attention block of a supported family in ``model``, with its qualified name.

    Raises:
        ValueError: if ``model`` has no such block, or a block lacks one of the linear
            projections that every supported family has.
    """
    found = [(name, module) for name, module in model.named_modules() if family_of_class(type(module)) is not None]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention block that can be upcycled; "
            f"supported families: {supported_families_text()}."
        )
    for name, module in found:
        for projection in PROJECTIONS:
            if not isinstance(getattr(module, projection, None), nn.Linear):
                raise ValueError(
                    f"{name} ({type(module).__name__}) has no nn.Linear {projection}; upcycling needs the separate "
                    f"projections {', '.join(PROJECTIONS)}."
                )
    return found
