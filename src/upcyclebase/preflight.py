"""Checks of command-line input that read only small files, run before any slow work.

A typo in a flag must cost seconds: these checks read a model's config (or an upcycled
folder's ``upcycle_config.json``) instead of its weights, and look at a dataset path
before anything is tokenized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import SELF_BASE, read_upcycled_config
from .config import CONFIG_NAME
from .families import FAMILIES, supported_families_text
from .models import _hub_error, resolve_model_path


SUPPORTED_MODEL_TYPES = tuple(family.model_type for family in FAMILIES)


@dataclass
class ModelShape:
    """Head count and context length of a model, read from its config only."""

    num_heads: int
    max_positions: int | None


def read_model_shape(model_id: str) -> ModelShape:
    """Read head count and context length of a base model id/path or an upcycled folder."""
    folder = Path(model_id).expanduser()
    if (folder / CONFIG_NAME).is_file():
        record = read_upcycled_config(folder)
        base = str(folder) if record["base_model"] == SELF_BASE else record["base_model"]
        max_positions = _base_max_positions(base) if (Path(base).expanduser() / "config.json").is_file() else None
        return ModelShape(record["shapes"]["num_attention_heads"], max_positions)

    from transformers import AutoConfig

    path = resolve_model_path(model_id)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as error:
        raise _hub_error(model_id, error) from error
    text = config.get_text_config()
    if text.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"Model {model_id!r} has model_type {text.model_type!r}, which cannot be upcycled; "
            f"supported families: {supported_families_text()}."
        )
    return ModelShape(text.num_attention_heads, getattr(text, "max_position_embeddings", None))


def _base_max_positions(path: str) -> int | None:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path).get_text_config(), "max_position_embeddings", None)


def check_top_k(value: int, num_heads: int, flag: str = "--top_k") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2 * num_heads:
        raise ValueError(
            f"{flag} {value} is out of range; use an integer from 1 to {2 * num_heads} (2 x {num_heads} heads)."
        )


def check_seq_len(seq_len: int, max_positions: int | None) -> None:
    if seq_len < 1:
        raise ValueError(f"--seq_len {seq_len} is invalid; use a positive integer.")
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"--seq_len {seq_len} is above the model's context of {max_positions} tokens; use at most {max_positions}.")


def check_output_folder(value: str, flag: str = "--output_dir") -> None:
    """Reject an output folder that is a file, lies below a file, or cannot be written where it would be created."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value!r} is a file; name a folder.")
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {value!r} cannot be created: {str(existing)!r} is a file; name a folder.")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {value!r} cannot be created: {str(existing)!r} is not writable; name a folder you can write to.")


def check_local_path(value: str, flag: str) -> None:
    """Reject a value that is written as a local path but does not exist."""
    looks_like_path = value.startswith((".", "/", "~")) or Path(value).suffix in (".txt", ".json", ".jsonl", ".parquet")
    if looks_like_path and not Path(value).expanduser().exists():
        raise FileNotFoundError(f"{flag} {value!r} not found; pass an existing file or folder.")

