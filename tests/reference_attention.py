"""A dense, loop-based reference of routed attention, written apart from the package code.

It recomputes one upcycled attention block from its weights with plain tensor math:
every head of both banks attends causally (within the sliding window on sliding layers)
to the shared key/value head of its group, and the output is the sum over selected heads
of gate x head output x that head's slice of its bank's output projection.
"""

from __future__ import annotations

import torch


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_gates(logits: torch.Tensor, top_k: int, gate_mode: str) -> torch.Tensor:
    """(T, E) gates: 1.0 (hard) or top_k x softmax over the selected logits (renorm)."""
    gates = torch.zeros_like(logits)
    top = logits.topk(top_k, dim=-1)
    if gate_mode == "hard":
        values = torch.ones_like(top.values)
    else:
        values = top_k * torch.softmax(top.values, dim=-1)
    return gates.scatter(-1, top.indices, values)


@torch.no_grad()
def reference_block(attn, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, top_k: int, gate_mode: str):
    """Output (T, C) of one upcycled block for one sequence ``hidden`` (T, C), no padding, no cache."""
    config = attn.config
    num_heads, num_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    eps = config.rms_norm_eps
    length = hidden.shape[0]
    window = config.sliding_window if attn.is_sliding else None

    logits = hidden @ attn.moh_router.weight.T + attn.moh_router.bias
    gates = reference_gates(logits.float(), top_k, gate_mode)

    keys = _rms_norm((hidden @ attn.k_proj.weight.T).view(length, num_kv, head_dim), attn.k_norm.weight, eps)
    keys = _rotate(keys, cos[:, None, :], sin[:, None, :])
    values = (hidden @ attn.v_proj.weight.T).view(length, num_kv, head_dim)

    output = torch.zeros(length, config.hidden_size, dtype=torch.float64)
    banks = [(attn.q_proj.weight, attn.o_proj.weight), (attn.q_proj_extra.weight, attn.o_proj_extra.weight)]
    for bank, (w_q, w_o) in enumerate(banks):
        queries = _rms_norm((hidden @ w_q.T).view(length, num_heads, head_dim), attn.q_norm.weight, eps)
        queries = _rotate(queries, cos[:, None, :], sin[:, None, :])
        for head in range(num_heads):
            kv = head // (num_heads // num_kv)
            w_o_head = w_o[:, head * head_dim:(head + 1) * head_dim].double()
            for t in range(length):
                gate = gates[t, bank * num_heads + head].item()
                if gate == 0.0:
                    continue
                start = 0 if window is None else max(0, t - window + 1)
                scores = (keys[start:t + 1, kv].double() @ queries[t, head].double()) * attn.scaling
                mixed = torch.softmax(scores, dim=0) @ values[start:t + 1, kv].double()
                output[t] += gate * (w_o_head @ mixed)
    return output
