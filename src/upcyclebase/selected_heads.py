"""Routed attention that computes only the selected heads.

The dense reference (``MoHAttentionMixin._dense_routed_forward``) projects, attends and
outputs all 2H heads and multiplies the unselected ones by a zero gate, so it pays for 2H
heads whatever top_k is. This path pays for top_k heads per token:

1. Rows. Each selected (token, head) pair is one row. Rows are sorted head by head, so
   the query and output projections of head e are one matmul over the tokens that
   selected e, against the rows of ``q_proj`` (or ``q_proj_extra``) that belong to e.
2. Slots. Extra head h+H shares the key/value head of original head h, so every row of a
   key/value group attends the same keys. Per token, the rows of group n are placed in
   slots 0..K'-1 of that group, where K' is the largest number of heads one token
   selected in one group. The attention then runs on (B, N*K', T, D) queries as the
   stock model runs on (B, H, T, D), with K' in place of H / N query heads per
   key/value head. Keys, values, cache, mask (causal, sliding window, padding) and
   attention kernel are the stock model's. With a separate K/V bank there are M = 2N
   groups of G heads each (extra head h+H reads key/value head N + h // G), and the
   same layout runs on (B, 2N*K', T, D) queries against 2N key/value heads.
3. Outputs. Each row's output is gated, goes through its own head's slice of ``o_proj``
   (or ``o_proj_extra``) and is summed into its token.

With one key/value head (MQA, as in Gemma-3 270M and 1B) every token has exactly top_k
rows, so K' = top_k and no slot is wasted. With several key/value heads, a token that
selected fewer than K' heads in a group leaves slots of zero queries whose outputs are
dropped: correct, but that attention work is wasted.

When every token of the batch selects the same heads (at init, where the router's weight
is zero, and in every one-token decoding step of one sequence), no rows are needed: the
selected heads' rows of ``q_proj``/``q_proj_extra`` and columns of ``o_proj``/``o_proj_extra``
are stacked into one query and one output projection, and the block runs as the stock
forward runs, on top_k heads instead of H. At init with top_k = H the stacked weights
hold the stock weights' values in the stock order, so the routed output equals the stock
output bit for bit, for either router init.

Shape legend:
    B: batch, T: query tokens, S: key tokens (cache included), C: hidden size,
    H: original query heads, N: key/value heads, G = H / N, D: head dim, E = 2H,
    M: key/value heads of the block (N, or 2N with a separate bank),
    R: selected (token, head) rows, K': query slots per key/value head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .router import route


@dataclass
class RowPlan:
    """Source token, head and attention slot of each selected (token, head) row.

    Rows are sorted by head (bank order: originals 0..H-1, extras H..2H-1), then by token.
    """

    token: torch.Tensor  # (R,) flat token index b * T + t
    head: torch.Tensor  # (R,) head index in bank order
    counts: list[int]  # (E,) rows per head
    slot: torch.Tensor  # (R,) row index into the (B * T * M * K') slot layout
    slots_per_group: int  # K'
    all_slots_filled: bool  # every slot gets a row, so the slot tensor needs no zero fill
    slots_in_row_order: bool  # slot == arange(R), so rows need no reordering
    num_groups: int  # M, the key/value heads that the slots are grouped by


def plan_rows(mask: torch.Tensor, num_kv_heads: int, top_k: int, kv_bank: str = "shared") -> RowPlan:
    """Lay out the selected heads of ``mask`` (B*T, E) as rows and attention slots.

    ``num_kv_heads`` is N, the original key/value heads; with ``kv_bank="separate"`` the
    slots are grouped by 2N key/value heads instead. On CUDA this synchronises with the
    host once or twice per call, because the per-head row counts size the projections'
    matmuls.
    """
    num_groups = num_kv_heads if kv_bank == "shared" else 2 * num_kv_heads
    if num_groups == 1:
        return _plan_rows_one_group(mask, top_k)
    tokens, num_heads_both = mask.shape
    num_heads = num_heads_both // 2
    groups = num_heads // num_kv_heads
    device = mask.device

    # (R,) head-major: nonzero of the transposed mask walks head by head, tokens ascending
    head, token = mask.t().nonzero(as_tuple=True)
    counts = torch.bincount(head, minlength=num_heads_both).tolist()

    heads = torch.arange(num_heads_both, device=device)
    if kv_bank == "shared":
        # (E,) heads in group order: for each key/value group, its originals then its extras
        group_order = heads.view(2, num_kv_heads, groups).transpose(0, 1).reshape(-1)
        group_of_head = (heads % num_heads) // groups
    else:
        # Bank order is already group order: head e reads key/value head e // G of 2N
        group_order = heads
        group_of_head = heads // groups
    # (B*T, M, E/M) selections per group
    by_group = mask[:, group_order].view(tokens, num_groups, -1)
    slots_per_group = int(by_group.sum(dim=-1).max())

    # (B*T, E) rank of each selected head among its token's selections in the same group
    rank_by_group = by_group.to(torch.int64).cumsum(dim=-1) - 1
    rank = torch.empty_like(rank_by_group.view(tokens, -1))
    rank[:, group_order] = rank_by_group.view(tokens, -1)

    slot = (token * num_groups + group_of_head[head]) * slots_per_group + rank[token, head]
    filled = slots_per_group * num_groups == top_k and bool((by_group.sum(dim=-1) == slots_per_group).all())
    return RowPlan(
        token, head, counts, slot, slots_per_group, all_slots_filled=filled, slots_in_row_order=False,
        num_groups=num_groups,
    )


def _plan_rows_one_group(mask: torch.Tensor, top_k: int) -> RowPlan:
    """With one key/value head, a row's slot is its position among the selections in token-major order."""
    tokens, num_heads_both = mask.shape
    token, head = mask.nonzero(as_tuple=True)  # token-major, heads ascending
    if tokens > 1:
        order = torch.argsort(head, stable=True)
        token, head, slot = token[order], head[order], order
    else:
        slot = torch.arange(head.shape[0], device=mask.device)
    counts = torch.bincount(head, minlength=num_heads_both).tolist()
    return RowPlan(
        token, head, counts, slot, top_k, all_slots_filled=True, slots_in_row_order=tokens == 1, num_groups=1
    )


@dataclass
class UniformSelection:
    """The heads that every token of a batch selected, in the orders the uniform path needs."""

    attention_order: list[int]  # (K,) heads in key/value group order, as the attention call lays them out
    output_order: list[int]  # (K,) the same heads by original head index, then bank: the stock o_proj order
    kv_heads: list[int] | None  # key/value heads the selected heads read; None when all of them
    slots_per_group: int  # selected heads per key/value head used


def uniform_selection(mask: torch.Tensor, num_kv_heads: int, kv_bank: str = "shared") -> UniformSelection | None:
    """Return the heads selected by every token of ``mask`` (B*T, E), or None if tokens differ.

    Also None when the key/value heads in use serve different numbers of selected heads,
    since one attention call needs the same number of query heads per key/value head.
    On CUDA this synchronises with the host once.
    """
    # One transfer: whether all tokens agree, then the first token's selection
    same_and_first = torch.cat([(mask == mask[:1]).all().view(1), mask[0]]).tolist()
    if not same_and_first[0]:
        return None
    heads = [head for head, selected in enumerate(same_and_first[1:]) if selected]
    num_heads = mask.shape[1] // 2
    groups = num_heads // num_kv_heads

    def kv_head(head: int) -> int:
        if kv_bank == "shared":
            return (head % num_heads) // groups
        return head // groups

    # Originals and extras of one original head are neighbours: the stock order at top_k = H
    output_order = sorted(heads, key=lambda head: (head % num_heads, head // num_heads))
    attention_order = sorted(output_order, key=kv_head)
    used = sorted({kv_head(head) for head in heads})
    per_group = [sum(kv_head(head) == group for head in heads) for group in used]
    if len(set(per_group)) != 1:
        return None
    all_used = len(used) == (num_kv_heads if kv_bank == "shared" else 2 * num_kv_heads)
    return UniformSelection(attention_order, output_order, None if all_used else used, per_group[0])


def _head_features(module: nn.Module, head: int, bank_modules: tuple[str, str]) -> tuple[nn.Linear, slice]:
    """Return the original-bank or extra-bank linear layer of head ``head`` (bank order) and its D features in it."""
    num_heads, head_dim = module.config.num_attention_heads, module.head_dim
    start = (head % num_heads) * head_dim
    return getattr(module, bank_modules[0] if head < num_heads else bank_modules[1]), slice(start, start + head_dim)


def _query_weight(module: nn.Module, head: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(D, C) rows of q_proj or q_proj_extra that compute head ``head`` (bank order), and their (D,) bias."""
    proj, features = _head_features(module, head, ("q_proj", "q_proj_extra"))
    return proj.weight[features], None if proj.bias is None else proj.bias[features]


def _output_weight(module: nn.Module, head: int) -> torch.Tensor:
    """(C, D) columns of o_proj or o_proj_extra that head ``head`` (bank order) feeds."""
    proj, features = _head_features(module, head, ("o_proj", "o_proj_extra"))
    return proj.weight[:, features]


def _stacked_query_projection(module: nn.Module, heads: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(K*D, C) weight and (K*D,) bias of ``heads``' queries; the stock q_proj's own when they are its heads."""
    if heads == list(range(module.config.num_attention_heads)):
        return module.q_proj.weight, module.q_proj.bias
    # NOTE: this copies the slices on every call. In one-token decoding steps that mix banks the
    # copy may cost more than the single matmul saves; the benchmark's generation profile points there.
    weights, biases = zip(*(_query_weight(module, head) for head in heads))
    return torch.cat(weights), None if biases[0] is None else torch.cat(biases)


def _stacked_output_projection(module: nn.Module, heads: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(C, K*D) weight of ``heads``' outputs and the bias the dense reference adds once per token."""
    biases = [proj.bias for proj in (module.o_proj, module.o_proj_extra) if proj.bias is not None]
    bias = None
    for term in biases:
        bias = term if bias is None else bias + term
    if heads == list(range(module.config.num_attention_heads)):
        return module.o_proj.weight, bias
    return torch.cat([_output_weight(module, head) for head in heads], dim=1), bias


def uniform_heads_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: Any,
    gates: torch.Tensor,
    selection: UniformSelection,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routed attention when every token selected the same K heads: the stock forward on those heads."""
    from .attention import _GroupedQueries

    batch, length = hidden_states.shape[:-1]
    head_dim = module.head_dim
    num_selected = len(selection.attention_order)

    # (B, K, T, D) queries of the selected heads, key/value group by group
    weight, bias = _stacked_query_projection(module, selection.attention_order)
    queries = F.linear(hidden_states, weight, bias).view(batch, length, num_selected, head_dim).transpose(1, 2)

    # (B, M, T, D) keys and values, normed and rotated as the stock model does
    keys, values = module.moh_keys_values(hidden_states)
    queries, keys = module.moh_norm_and_rotate(queries, keys, position_embeddings)

    # (B, M, S, D) with the cache, then only the key/value heads the selected heads read
    keys, values = module.moh_update_cache(keys, values, cache, kwargs)
    if selection.kv_heads is not None:
        used = torch.tensor(selection.kv_heads, device=keys.device)
        keys, values = keys.index_select(1, used), values.index_select(1, used)

    # (B, T, K, D)
    view = _GroupedQueries(module, selection.slots_per_group)
    attn_output, attn_weights = module.moh_attend(view, queries, keys, values, attention_mask, kwargs)

    # (B, T, K, D) in output order, gated
    if selection.output_order != selection.attention_order:
        position = {head: index for index, head in enumerate(selection.attention_order)}
        order = torch.tensor([position[head] for head in selection.output_order], device=attn_output.device)
        attn_output = attn_output.index_select(2, order)
    # Hard gates are exactly 1.0 in the forward pass, so without autograd the product is skipped
    if module.moh_gate_mode != "hard" or gates.requires_grad:
        heads = torch.tensor(selection.output_order, device=gates.device)
        attn_output = attn_output * gates.index_select(-1, heads).unsqueeze(-1)

    # (B, T, C)
    weight, bias = _stacked_output_projection(module, selection.output_order)
    return F.linear(attn_output.reshape(batch, length, -1), weight, bias), attn_weights


def _project_queries(module: nn.Module, hidden: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """Project the selected rows to queries in the (B*T*N*K', D) slot layout, one matmul per head."""
    parts = []
    for head, tokens in enumerate(plan.token.split(plan.counts)):
        if tokens.shape[0] == 0:
            continue
        weight, bias = _query_weight(module, head)
        parts.append(F.linear(hidden.index_select(0, tokens), weight, bias))
    rows = torch.cat(parts)  # (R, D)
    if plan.slots_in_row_order:
        return rows
    slots = hidden.shape[0] * plan.slots_per_group * plan.num_groups
    empty = rows.new_empty if plan.all_slots_filled else rows.new_zeros
    return empty(slots, module.head_dim).index_copy(0, plan.slot, rows)


def _project_outputs(module: nn.Module, rows: torch.Tensor, plan: RowPlan, tokens: int) -> torch.Tensor:
    """Project each row through its head's columns of o_proj and sum the rows of each token into (B*T, C)."""
    output = rows.new_zeros(tokens, module.config.hidden_size)
    for head, (head_rows, head_tokens) in enumerate(zip(rows.split(plan.counts), plan.token.split(plan.counts))):
        if head_rows.shape[0] == 0:
            continue
        output.index_add_(0, head_tokens, F.linear(head_rows, _output_weight(module, head)))

    # The dense reference adds each bank's bias once per token, whatever was selected
    for proj in (module.o_proj, module.o_proj_extra):
        if proj.bias is not None:
            output = output + proj.bias
    return output


def selected_heads_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routed attention of an upcycled block that computes only the top_k selected heads per token.

    Returns the same output as the dense reference up to float rounding. Attention
    weights, where the attention function returns them, are in the slot layout
    (B, M*K', T, S), not per head, so the attention module runs the dense reference
    when a caller requests ``output_attentions``.
    """
    from .attention import _GroupedQueries

    num_heads, head_dim = module.config.num_attention_heads, module.head_dim
    num_kv_heads = module.config.num_key_value_heads
    batch, length = hidden_states.shape[:-1]
    tokens = batch * length

    # (B, T, E): which heads each token uses, and their gates
    routing = route(module.moh_router(hidden_states), module.moh_top_k, module.moh_gate_mode)
    if module.moh_record_routing:
        module.moh_last_routing = routing
    mask = routing.mask.view(tokens, 2 * num_heads)
    selection = uniform_selection(mask, num_kv_heads, module.moh_kv_bank)
    if selection is not None:
        return uniform_heads_forward(
            module, hidden_states, position_embeddings, attention_mask, cache, routing.gates, selection, **kwargs
        )
    plan = plan_rows(mask, num_kv_heads, module.moh_top_k, module.moh_kv_bank)
    slots = plan.num_groups * plan.slots_per_group

    # (B, M*K', T, D) queries of the selected heads in their slots
    queries = _project_queries(module, hidden_states.reshape(tokens, -1), plan)
    queries = queries.view(batch, length, slots, head_dim).transpose(1, 2)

    # (B, M, T, D) keys and values; with a shared bank, the stock model's
    keys, values = module.moh_keys_values(hidden_states)

    # Same norms and rotary embedding as the original heads; both act on each row alone
    queries, keys = module.moh_norm_and_rotate(queries, keys, position_embeddings)

    # (B, M, S, D) with the cache; a shared bank's cache is laid out exactly as the stock model's
    keys, values = module.moh_update_cache(keys, values, cache, kwargs)

    # (B, T, M*K', D): each key/value head serves its K' slots
    view = _GroupedQueries(module, plan.slots_per_group)
    attn_output, attn_weights = module.moh_attend(view, queries, keys, values, attention_mask, kwargs)

    # (R, D) outputs of the selected rows, gated
    rows = attn_output.reshape(tokens * slots, head_dim)
    if not plan.slots_in_row_order:
        rows = rows.index_select(0, plan.slot)
    # Hard gates are exactly 1.0 in the forward pass, so without autograd the product is skipped
    if module.moh_gate_mode != "hard" or routing.gates.requires_grad:
        gates = routing.gates.view(tokens, -1)[plan.token, plan.head]
        rows = rows * gates.unsqueeze(-1)

    # (B, T, C)
    output = _project_outputs(module, rows, plan, tokens)
    return output.view(batch, length, -1), attn_weights
