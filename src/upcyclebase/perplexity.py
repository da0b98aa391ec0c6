"""Held-out perplexity of a causal LM on a text file: a fast second metric next to MMLU.

Each text is tokenized with the tokenizer's special tokens (Gemma adds BOS), cut into
windows of at most ``max_length`` tokens without overlap, and every token after the first
of a window is scored. Perplexity is exp(total negative log-likelihood / scored tokens).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_TOKENS = 4_096


def default_perplexity_file() -> Path:
    """Return the validation split of the prepared training corpus (``validation.jsonl``, field ``text``)."""
    try:
        from .data import default_corpus_dir
    except ImportError:
        # Same rule as upcyclebase.data.default_corpus_dir, for installs without that module.
        home = os.environ.get("UPCYCLEBASE_HOME") or Path.home() / ".cache" / "upcyclebase"
        return Path(home) / "corpus" / "validation.jsonl"
    return default_corpus_dir() / "validation.jsonl"


def read_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Read texts from a ``.jsonl`` file (one object per line, text in ``text_field``) or a plain text file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Perplexity file {str(path)!r} not found; pass an existing .jsonl or .txt file.")
    texts = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line.rstrip("\n"))
                continue
            record = json.loads(line)
            if text_field not in record:
                raise ValueError(f"{path}:{line_number} has no field {text_field!r}; its fields are {sorted(record)}.")
            texts.append(record[text_field])
    if not texts:
        raise ValueError(f"Perplexity file {str(path)!r} contains no text.")
    return texts


@dataclass
class PerplexityResult:
    """Perplexity with the counts behind it."""

    perplexity: float
    mean_nll: float
    tokens: int
    texts: int
    seconds: float


@torch.no_grad()
def compute_perplexity(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Score ``texts`` in order until ``max_tokens`` tokens are scored (None: all of them).

    Args:
        max_length: window length in tokens; the first token of each window is context only.
        max_tokens: stop after the window that reaches this many scored tokens.
    """
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too small; use at least 2 tokens per window.")
    device = next(model.parameters()).device
    total_nll, scored, used = 0.0, 0, 0
    start = time.perf_counter()
    progress = tqdm(total=max_tokens, desc=desc, unit="tok", leave=False)
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        used += 1
        for begin in range(0, len(ids) - 1, max_length):
            window = ids[begin:begin + max_length].unsqueeze(0).to(device)
            if window.shape[1] < 2:
                continue

            # (1, T - 1, V) next-token log-likelihoods, in float32 whatever the model's dtype
            logits = model(window).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[0, 1:], reduction="sum")
            total_nll += nll.item()
            scored += window.shape[1] - 1
            progress.update(window.shape[1] - 1)
            if max_tokens is not None and scored >= max_tokens:
                break
        if max_tokens is not None and scored >= max_tokens:
            break
    progress.close()
    if scored == 0:
        raise ValueError("No tokens to score: every text is shorter than two tokens.")
    mean_nll = total_nll / scored
    return PerplexityResult(math.exp(mean_nll), mean_nll, scored, used, time.perf_counter() - start)
