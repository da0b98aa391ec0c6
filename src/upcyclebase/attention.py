"""Routed attention: a second bank of query heads next to the original, chosen top-k per token.

An upcycled attention block keeps the original module and its parameter names
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, norms) and adds three submodules:

    q_proj_extra  hidden -> H * D   queries of the extra bank (a copy of q_proj at init)
    o_proj_extra  H * D -> hidden   output projection of the extra bank (a copy of o_proj's
                                    weight, no bias: o_proj's bias is added once per token)
    moh_router    hidden -> 2H      one logit per head, originals 0..H-1, extras H..2H-1

With ``kv_bank="shared"`` extra head h+H reads the key/value head of original head h, so
the KV cache is the stock one. With ``kv_bank="separate"`` the extra bank also gets

    k_proj_extra  hidden -> N * D   keys of the extra bank (a copy of k_proj at init)
    v_proj_extra  hidden -> N * D   values of the extra bank (a copy of v_proj at init)

and the routed forward writes 2N key/value heads per layer to the cache, originals
0..N-1 then extras N..2N-1, so extra head h+H reads key/value head N + h // G.

With the identity shortcut on (or routing off) the original ``forward`` runs untouched,
writing N heads to the cache. The one exception: with a separate bank and a cache that
routed steps already filled with 2N heads, the original heads run on that cache (see
``_original_heads_forward``). A routed step on a cache of N heads raises a ValueError,
because the extra bank's keys and values of the earlier tokens are missing.

Shape legend:
    B: batch, T: query tokens, S: key tokens (cache included), C: hidden size,
    H: original query heads, N: key/value heads, G = H / N, D: head dim, E = 2H.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import UpcycleConfig
from .families import AttentionFamily, family_of_class
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
    moh_kv_bank: str
    moh_record_routing: bool
    moh_last_routing: Routing | None
    _moh_base_class: type
    _moh_family: AttentionFamily
    # True runs the dense reference: all 2H heads computed, unselected ones gated to zero
    moh_dense_reference: bool = False

    def _init_moh(self, config: UpcycleConfig) -> None:
        """Create the extra bank as copies of the original heads and a router selecting H of 2H."""
        num_heads = self.config.num_attention_heads
        q_proj, o_proj = self.q_proj, self.o_proj
        factory = {"device": q_proj.weight.device, "dtype": q_proj.weight.dtype}

        self.q_proj_extra = _copy_linear(q_proj)
        if config.kv_bank == "separate":
            self.k_proj_extra = _copy_linear(self.k_proj)
            self.v_proj_extra = _copy_linear(self.v_proj)
        # Both banks' outputs are summed, so a bias on each would add o_proj's bias twice
        self.o_proj_extra = _copy_linear(o_proj, bias=False)
        self.moh_router = nn.Linear(self.config.hidden_size, 2 * num_heads, bias=True, **factory)
        init_router_bias(self.moh_router, num_heads, config.router_init, config.router_bias, self.layer_idx)

        self.moh_gate_mode = config.gate_mode
        self.moh_kv_bank = config.kv_bank
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

    @property
    def moh_num_kv_heads(self) -> int:
        """Key/value heads that routed steps write to the cache: N, or 2N with a separate bank."""
        num_kv_heads = self.config.num_key_value_heads
        return 2 * num_kv_heads if self.moh_kv_bank == "separate" else num_kv_heads

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
            if self.moh_kv_bank == "separate" and self._cache_holds_extra_bank(args, kwargs):
                return self._original_heads_forward(*args, **kwargs)
            return super().forward(*args, **kwargs)
        # Attention weights come back per head only from the dense path
        if self.moh_dense_reference or kwargs.get("output_attentions"):
            return self._dense_routed_forward(*args, **kwargs)
        return self._routed_forward(*args, **kwargs)

    def _cache_holds_extra_bank(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        # forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs) in every family
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and len(args) > 3:
            cache = args[3]
        return cache is not None and cached_kv_heads(cache, self.layer_idx) == self.moh_num_kv_heads

    def moh_keys_values(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, T, D) keys and values before norm and RoPE, M = N, or 2N with a separate bank (originals first)."""
        batch, length = hidden_states.shape[:-1]
        keys, values = self.k_proj(hidden_states), self.v_proj(hidden_states)
        if self.moh_kv_bank == "separate":
            keys = torch.cat([keys, self.k_proj_extra(hidden_states)], dim=-1)
            values = torch.cat([values, self.v_proj_extra(hidden_states)], dim=-1)
        keys = keys.view(batch, length, -1, self.head_dim).transpose(1, 2)
        values = values.view(batch, length, -1, self.head_dim).transpose(1, 2)
        return keys, values

    def moh_norm_and_rotate(
        self, queries: torch.Tensor, keys: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the family's norms (if it has them) and RoPE to (B, heads, T, D) queries and keys, each head alone."""
        if self._moh_family.qk_norm:
            queries = self.q_norm(queries)
            keys = self.k_norm(keys)
        cos, sin = position_embeddings
        return self._moh_family.apply_rotary(queries, keys, cos, sin)

    def moh_update_cache(
        self, keys: torch.Tensor, values: torch.Tensor, cache: Any, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, M, T, D) keys and values to the cache and return (B, M, S, D) with the cached ones."""
        if cache is None:
            return keys, values
        cached = cached_kv_heads(cache, self.layer_idx)
        if cached is not None and cached != keys.shape[1]:
            raise ValueError(
                f"The KV cache of layer {self.layer_idx} contains {cached} key/value heads, but routed attention with "
                f"kv_bank={self.moh_kv_bank!r} writes {keys.shape[1]}. A cache filled with the identity shortcut on "
                "or routing off contains only the original heads; start again with a new cache after set_moh()."
            )
        return cache.update(keys, values, self.layer_idx, kwargs=kwargs)

    def moh_attention_interface(self):
        """The attention function of the model's ``_attn_implementation``, else the family's eager one."""
        return ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._moh_family.eager_attention())

    def moh_attention_kwargs(self) -> dict[str, Any]:
        """Keyword arguments the stock forward passes to the attention function beyond dropout and scaling."""
        return self._moh_family.attention_kwargs(self)

    def moh_attend(self, view: Any, queries, keys, values, attention_mask, kwargs: dict[str, Any]):
        """Call the configured attention function as the stock forward does, with ``view`` as the module."""
        return self.moh_attention_interface()(
            view,
            queries,
            keys,
            values,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **self.moh_attention_kwargs(),
            **kwargs,
        )

    def _original_heads_forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **kwargs: Any,
    ):
        """Run the stock attention of the original heads on a cache that also contains the separate extra bank.

        The new tokens' keys and values of both banks go to the cache, so that routed
        steps after this one find it complete; the original queries attend to key/value
        heads 0..N-1 only, as in the stock model.
        """
        cache = cache if cache is not None else past_key_values
        batch, length = hidden_states.shape[:-1]
        num_kv_heads = self.config.num_key_value_heads

        # (B, H, T, D) original queries; (B, 2N, T, D) keys and values of both banks
        queries = self.q_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        keys, values = self.moh_keys_values(hidden_states)
        queries, keys = self.moh_norm_and_rotate(queries, keys, position_embeddings)

        # (B, N, S, D) the original heads of the cache
        keys, values = self.moh_update_cache(keys, values, cache, kwargs)
        keys, values = keys[:, :num_kv_heads], values[:, :num_kv_heads]

        # (B, T, H, D) -> (B, T, C)
        attn_output, attn_weights = self.moh_attend(self, queries, keys, values, attention_mask, kwargs)
        return self.o_proj(attn_output.reshape(batch, length, -1)), attn_weights

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
        # A shared bank needs queries in group order, unless one key/value head serves them all
        regroup = self.moh_kv_bank == "shared" and num_kv_heads > 1
        input_shape = hidden_states.shape[:-1]
        batch, length = input_shape

        # (B, T, E): which heads each token uses, and their gates
        routing = route(self.moh_router(hidden_states), self.moh_top_k, self.moh_gate_mode)
        if self.moh_record_routing:
            self.moh_last_routing = routing

        # (B, E, T, D) queries of both banks; (B, M, T, D) keys and values, M = N shared or 2N separate
        queries = torch.cat([self.q_proj(hidden_states), self.q_proj_extra(hidden_states)], dim=-1)
        queries = queries.view(batch, length, 2 * num_heads, head_dim).transpose(1, 2)
        keys, values = self.moh_keys_values(hidden_states)

        # Same norms and rotary embedding as the original heads
        queries, keys = self.moh_norm_and_rotate(queries, keys, position_embeddings)

        # (B, M, S, D) with the cache; a shared bank's cache is laid out exactly as the stock model's
        keys, values = self.moh_update_cache(keys, values, cache, kwargs)

        # (B, E, T, D) in group order: key/value head n serves originals then extras of group n.
        # A separate bank needs no reordering: head e reads key/value head e // G in bank order.
        if regroup:
            queries = queries.view(batch, 2, num_kv_heads, groups, length, head_dim).transpose(1, 2)
            queries = queries.reshape(batch, 2 * num_heads, length, head_dim)

        # (B, T, E, D) per-head outputs
        view = _GroupedQueries(self, 2 * groups if self.moh_kv_bank == "shared" else groups)
        attn_output, attn_weights = self.moh_attend(view, queries, keys, values, attention_mask, kwargs)

        # (B, T, E, D) back in bank order: originals 0..H-1, extras H..2H-1
        if regroup:
            attn_output = attn_output.reshape(batch, length, num_kv_heads, 2, groups, head_dim).transpose(2, 3)
            attn_output = attn_output.reshape(batch, length, 2 * num_heads, head_dim)

        # (B, T, C): each bank's gated heads through its own output projection
        gated = attn_output * routing.gates.unsqueeze(-1)
        original = self.o_proj(gated[:, :, :num_heads].reshape(*input_shape, -1))
        extra = self.o_proj_extra(gated[:, :, num_heads:].reshape(*input_shape, -1))
        return original + extra, attn_weights


def _copy_linear(linear: nn.Linear, bias: bool | None = None) -> nn.Linear:
    """Return a new nn.Linear of the same shape, device and dtype, with copies of ``linear``'s weight and bias."""
    bias = linear.bias is not None if bias is None else bias
    factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    copy = nn.Linear(linear.in_features, linear.out_features, bias=bias, **factory)
    with torch.no_grad():
        copy.weight.copy_(linear.weight)
        if bias:
            copy.bias.copy_(linear.bias)
    return copy


def cached_kv_heads(cache: Any, layer_idx: int) -> int | None:
    """Return the number of key/value heads cached for layer ``layer_idx``, or None while that layer is empty."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    keys = getattr(layers[layer_idx], "keys", None)
    if not getattr(layers[layer_idx], "is_initialized", False) or keys is None or keys.dim() != 4:
        return None
    return keys.shape[1]


_MOH_CLASSES: dict[type, type] = {}


def moh_class(attention_cls: type) -> type:
    """Return the upcycled subclass of a transformers attention class, made once and registered here."""
    if attention_cls not in _MOH_CLASSES:
        family = family_of_class(attention_cls)
        if family is None:
            raise ValueError(f"{attention_cls.__name__} is not an attention class of a supported family.")
        name = f"MoH{attention_cls.__name__}"
        namespace = {
            "__module__": __name__,
            "__qualname__": name,
            "_moh_base_class": attention_cls,
            "_moh_family": family,
        }
        cls = type(name, (MoHAttentionMixin, attention_cls), namespace)
        _MOH_CLASSES[attention_cls] = cls
        globals()[name] = cls  # so that pickle and copy find it
    return _MOH_CLASSES[attention_cls]


def is_moh_attention(module: nn.Module) -> bool:
    return isinstance(module, MoHAttentionMixin)
