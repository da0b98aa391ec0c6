"""Routed attention: a second bank of query heads next to the original, chosen top-k per token.

An upcycled attention block keeps the original module and its parameter names
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, norms) and adds three submodules:

    q_proj_extra  hidden -> H * D   queries of the extra bank (a copy of q_proj at init)
    o_proj_extra  H * D -> hidden   output projection of the extra bank (a copy of o_proj)
    moh_router    hidden -> 2H      one logit per head, originals 0..H-1, extras H..2H-1

Extra head h+H shares the key/value head of original head h, so the KV cache is the
stock one. With the identity shortcut on, the original ``forward`` runs untouched.

Shape legend:
    B: batch, T: query tokens, S: key tokens (cache included), C: hidden size,
    H: original query heads, N: key/value heads, G = H / N, D: head dim, E = 2H.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from .config import UpcycleConfig
from .router import Routing, init_router_bias, route
from .selected_heads import selected_heads_forward

from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class _GroupedQueries:
    """The attention module as transformers' attention functions should see it for 2H queries.

    Those functions repeat each key/value head ``module.num_key_value_groups`` times; with
    both banks laid out group by group, each key/value head serves 2G query heads.
    """

    def __init__(self, module: nn.Module, groups: int) -> None:
        self._module = module
        self.num_key_value_groups = groups

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class MoHAttentionMixin:
    """Adds the extra bank, the router and the routed forward to a transformers attention class.

    Subclasses are made by :func:`moh_class` from the model's own attention class, so the
    original ``forward`` is ``super().forward`` and every original parameter keeps its name.
    """

    moh_enabled: bool
    moh_identity_shortcut: bool
    moh_top_k: int
    moh_gate_mode: str
    moh_record_routing: bool
    moh_last_routing: Routing | None
    _moh_base_class: type
    # True runs the dense reference: all 2H heads computed, unselected ones gated to zero
    moh_dense_reference: bool = False

    def _init_moh(self, config: UpcycleConfig) -> None:
        """Create the extra bank as copies of the original heads and a router selecting H of 2H."""
        num_heads = self.config.num_attention_heads
        q_proj, o_proj = self.q_proj, self.o_proj
        factory = {"device": q_proj.weight.device, "dtype": q_proj.weight.dtype}

        self.q_proj_extra = nn.Linear(q_proj.in_features, q_proj.out_features, bias=q_proj.bias is not None, **factory)
        self.o_proj_extra = nn.Linear(o_proj.in_features, o_proj.out_features, bias=o_proj.bias is not None, **factory)
        self.moh_router = nn.Linear(self.config.hidden_size, 2 * num_heads, bias=True, **factory)
        with torch.no_grad():
            self.q_proj_extra.load_state_dict(q_proj.state_dict())
            self.o_proj_extra.load_state_dict(o_proj.state_dict())
        init_router_bias(self.moh_router, num_heads, config.router_init, config.router_bias, self.layer_idx)

        self.moh_gate_mode = config.gate_mode
        self.moh_record_routing = False
        self.moh_last_routing = None
        self.moh_enabled = config.enabled
        self.moh_identity_shortcut = config.identity_shortcut
        self.moh_top_k = num_heads
        self.set_moh(top_k=config.top_k)

    @property
    def moh_num_heads(self) -> int:
        """Heads in both banks, 2H."""
        return 2 * self.config.num_attention_heads

    def set_moh(
        self, enabled: bool | None = None, identity_shortcut: bool | None = None, top_k: int | None = None
    ) -> None:
        """Switch routing on or off, take the identity shortcut or not, and set top_k (1..2H)."""
        if top_k is not None:
            self.check_top_k(top_k)
            self.moh_top_k = top_k
        if enabled is not None:
            self.moh_enabled = bool(enabled)
        if identity_shortcut is not None:
            self.moh_identity_shortcut = bool(identity_shortcut)

    def check_top_k(self, top_k: int) -> None:
        """Raise a ValueError unless top_k is an integer from 1 to 2H."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.moh_num_heads:
            raise ValueError(
                f"top_k={top_k!r} is out of range; use an integer from 1 to {self.moh_num_heads} "
                f"(2 x {self.moh_num_heads // 2} heads)."
            )

    @property
    def moh_routed(self) -> bool:
        """Whether the next forward runs the routed path."""
        return self.moh_enabled and not self.moh_identity_shortcut

    def forward(self, *args: Any, **kwargs: Any):
        if not self.moh_routed:
            return super().forward(*args, **kwargs)
        # Attention weights come back per head only from the dense path
        if self.moh_dense_reference or kwargs.get("output_attentions"):
            return self._dense_routed_forward(*args, **kwargs)
        return self._routed_forward(*args, **kwargs)

    @property
    def _family_module(self):
        """The transformers module that defines the original class, for its rotary and eager functions."""
        return sys.modules[self._moh_base_class.__module__]

    def _routed_forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        """Routed attention computing only the selected heads (see :mod:`upcyclebase.selected_heads`)."""
        cache = cache if cache is not None else past_key_values
        return selected_heads_forward(self, hidden_states, position_embeddings, attention_mask, cache, **kwargs)

    def _dense_routed_forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        cache = cache if cache is not None else past_key_values
        num_heads, head_dim = self.config.num_attention_heads, self.head_dim
        num_kv_heads = self.config.num_key_value_heads
        groups = num_heads // num_kv_heads
        input_shape = hidden_states.shape[:-1]
        batch, length = input_shape

        # (B, T, E): which heads each token uses, and their gates
        routing = route(self.moh_router(hidden_states), self.moh_top_k, self.moh_gate_mode)
        if self.moh_record_routing:
            self.moh_last_routing = routing

        # (B, E, T, D) queries of both banks; (B, N, T, D) shared keys and values
        queries = torch.cat([self.q_proj(hidden_states), self.q_proj_extra(hidden_states)], dim=-1)
        queries = queries.view(batch, length, 2 * num_heads, head_dim).transpose(1, 2)
        keys = self.k_proj(hidden_states).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)
        values = self.v_proj(hidden_states).view(batch, length, num_kv_heads, head_dim).transpose(1, 2)

        # Same norms and rotary embedding as the original heads
        queries = self.q_norm(queries)
        keys = self.k_norm(keys)
        cos, sin = position_embeddings
        queries, keys = self._family_module.apply_rotary_pos_emb(queries, keys, cos, sin)

        # (B, N, S, D) with the cache, laid out exactly as the stock model's
        if cache is not None:
            keys, values = cache.update(keys, values, self.layer_idx, kwargs=kwargs)

        # (B, E, T, D) in group order: key/value head n serves originals then extras of group n
        if num_kv_heads > 1:
            queries = queries.view(batch, 2, num_kv_heads, groups, length, head_dim).transpose(1, 2)
            queries = queries.reshape(batch, 2 * num_heads, length, head_dim)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._family_module.eager_attention_forward
        )
        # (B, T, E, D) per-head outputs
        attn_output, attn_weights = attention_interface(
            _GroupedQueries(self, 2 * groups),
            queries,
            keys,
            values,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )

        # (B, T, E, D) back in bank order: originals 0..H-1, extras H..2H-1
        if num_kv_heads > 1:
            attn_output = attn_output.reshape(batch, length, num_kv_heads, 2, groups, head_dim).transpose(2, 3)
            attn_output = attn_output.reshape(batch, length, 2 * num_heads, head_dim)

        # (B, T, C): each bank's gated heads through its own output projection
        gated = attn_output * routing.gates.unsqueeze(-1)
        original = self.o_proj(gated[:, :, :num_heads].reshape(*input_shape, -1))
        extra = self.o_proj_extra(gated[:, :, num_heads:].reshape(*input_shape, -1))
        return original + extra, attn_weights


_MOH_CLASSES: dict[type, type] = {}


def moh_class(attention_cls: type) -> type:
    """The upcycled subclass of a transformers attention class, made once and registered here."""
    if attention_cls not in _MOH_CLASSES:
        name = f"MoH{attention_cls.__name__}"
        namespace = {"__module__": __name__, "__qualname__": name, "_moh_base_class": attention_cls}
        cls = type(name, (MoHAttentionMixin, attention_cls), namespace)
        _MOH_CLASSES[attention_cls] = cls
        globals()[name] = cls  # so that pickle and copy find it
    return _MOH_CLASSES[attention_cls]


def is_moh_attention(module: nn.Module) -> bool:
    return isinstance(module, MoHAttentionMixin)
