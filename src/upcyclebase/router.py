"""Top-k routing over the 2H heads of an upcycled attention block.

Shape legend used in this file:
    B: batch, T: query tokens, E: heads in both banks (2H), K: selected heads per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Routing:
    """The outcome of routing one batch: per-head gates and what produced them."""

    gates: torch.Tensor  # (B, T, E), 0 for unselected heads
    mask: torch.Tensor  # (B, T, E) bool, True for selected heads
    probs: torch.Tensor  # (B, T, E) fp32 softmax over all heads


def init_router_bias(router: nn.Linear, num_heads: int, router_init: str, magnitude: float, layer_idx: int) -> None:
    """Zero the router weight and set its bias so that H heads are selected at init.

    ``original`` selects heads 0..H-1. ``interleaved`` selects, for each pair (h, h+H),
    the original when (h + layer_idx) is even and the copy otherwise, so every extra head
    is selected in half of the layers and gets gradient from the first step.
    """
    selected_extra = torch.zeros(num_heads, dtype=torch.bool)
    if router_init == "interleaved":
        selected_extra = (torch.arange(num_heads) + layer_idx) % 2 == 1
    bias = torch.cat([torch.where(selected_extra, -magnitude, magnitude), torch.where(selected_extra, magnitude, -magnitude)])
    with torch.no_grad():
        router.weight.zero_()
        router.bias.copy_(bias.to(router.bias))


def route(logits: torch.Tensor, top_k: int, gate_mode: str) -> Routing:
    """Select the top_k heads of each token and compute their gates.

    In ``hard`` mode a selected gate is exactly 1.0 in the forward pass and passes the
    gradient of the softmax probability to the router (straight-through), as MoH does
    when converting a pretrained model. In ``renorm`` mode the gates are top_k times the
    softmax renormalised over the selected heads; equal selected logits give exactly 1.0.
    """
    # (B, T, E) probabilities in fp32 whatever the model dtype
    probs = torch.softmax(logits.float(), dim=-1)

    # (B, T, K) selected heads; (B, T, E) selection mask
    top_logits, top_idx = logits.float().topk(top_k, dim=-1)
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, top_idx, True)

    if gate_mode == "hard":
        # p - p.detach() is exactly 0.0, so the forward value is exactly 1.0
        gates = (probs - probs.detach() + 1.0) * mask
    else:
        # Subtracting the max makes equal logits give exp(0) = 1.0 each, so k / sum = 1.0 exactly
        weights = torch.exp(top_logits - top_logits.max(dim=-1, keepdim=True).values)
        top_gates = weights * (top_k / weights.sum(dim=-1, keepdim=True))
        gates = torch.zeros_like(probs).scatter(-1, top_idx, top_gates)

    return Routing(gates=gates.to(logits.dtype), mask=mask, probs=probs)


def load_balance_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MoH's load-balance loss sum_i P_i f_i, scaled so a uniform router scores 1.0.

    P_i is the mean routing probability of head i and f_i the fraction of selections
    that went to head i, both over all tokens of the batch.
    """
    num_heads = probs.shape[-1]
    mean_prob = probs.reshape(-1, num_heads).mean(dim=0)  # (E,)
    share = mask.reshape(-1, num_heads).float().mean(dim=0)
    share = share / share.sum().clamp_min(1e-9)  # (E,)
    return num_heads * (mean_prob * share).sum()
