"""Check an upcycled model against the stock model it came from, on fixed prompts.

The stock logits and generations are recorded before upcycling, so the reference is
the untouched transformers model, not the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

PROMPTS = (
    "The capital of France is",
    "In 1905, Albert Einstein published four papers that",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which green plants",
)
NEW_TOKENS = 32


@dataclass
class Reference:
    """Logits of each prompt and its greedy continuation, from one model state."""

    logits: list[torch.Tensor] = field(default_factory=list)
    generations: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Check:
    name: str
    max_diff: float
    same_generations: bool | None
    passed: bool
    note: str = ""


def encode_prompts(tokenizer, device: str | torch.device) -> list[torch.Tensor]:
    return [tokenizer(prompt, return_tensors="pt").input_ids.to(device) for prompt in PROMPTS]


@torch.no_grad()
def record(model: nn.Module, prompts: list[torch.Tensor], generate: bool = True, desc: str = "") -> Reference:
    """Run every prompt through ``model``: its logits and, if asked, 32 greedy tokens with a KV cache."""
    reference = Reference()
    for ids in tqdm(prompts, desc=desc or "prompts", leave=False, disable=not desc):
        reference.logits.append(model(ids).logits.float().cpu())
        if generate:
            out = model.generate(
                ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True,
                pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
            )
            reference.generations.append(out[0, ids.shape[1]:].cpu())
    return reference


def compare(name: str, expected: Reference, found: Reference, tolerance: float | None, note: str = "") -> Check:
    """Compare two references: ``tolerance`` None requires bitwise equality, a number bounds the max logit difference."""
    max_diff = max((a - b).abs().max().item() for a, b in zip(expected.logits, found.logits))
    if tolerance is None:
        passed = all(torch.equal(a, b) for a, b in zip(expected.logits, found.logits))
    else:
        passed = max_diff <= tolerance
    same = None
    if expected.generations and found.generations:
        same = all(torch.equal(a, b) for a, b in zip(expected.generations, found.generations))
        passed = passed and same
    return Check(name, max_diff, same, passed, note)


def format_report(checks: list[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = [f"{'check':<{width}}  {'max |logit diff|':>16}  {'greedy tokens':>13}  result", "-" * (width + 42)]
    for check in checks:
        same = {None: "-", True: "identical", False: "differ"}[check.same_generations]
        result = "PASS" if check.passed else "FAIL"
        lines.append(f"{check.name:<{width}}  {check.max_diff:>16.3e}  {same:>13}  {result}  {check.note}".rstrip())
    return "\n".join(lines)
