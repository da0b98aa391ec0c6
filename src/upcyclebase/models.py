"""Loading base models: Hub ids, local folders and the embedded default, on a chosen device and dtype."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .embedded import EMBEDDED_ALIASES, EMBEDDED_MODEL_ID, SMOLLM2_MODEL_ID, prepare_embedded_model, prepare_smollm2_model

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "google/gemma-3-1b-it"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(OSError):
    """A model id or path that can be neither found locally nor downloaded."""


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device(device: str) -> None:
    """Raise a ValueError if ``device`` is not a device name or is not available here."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is invalid; use cuda, cuda:N, mps or cpu.") from None
    kind = parsed.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} is not available: this torch build has no CUDA or sees no GPU; use --device cpu.")
    if kind == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r} is not available: {torch.cuda.device_count()} GPU(s) visible; use cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device!r} is not available: this torch build or machine has no MPS; use --device cpu.")
    if kind not in ("cuda", "mps", "cpu"):
        raise ValueError(f"--device {device!r} is not supported; use cuda, cuda:N, mps or cpu.")


def resolve_device_dtype(device: str | None = None, dtype: str | torch.dtype | None = None) -> tuple[str, torch.dtype]:
    """Pick the device and dtype: CUDA bf16, MPS fp16 (MPS rejects bf16), CPU fp32 (bf16 is slow on most CPUs).

    Raises:
        ValueError: if the device is invalid or not available, or the dtype is unknown.
    """
    device = device or default_device()
    check_device(device)
    if dtype is None:
        dtype = {"cuda": torch.bfloat16, "mps": torch.float16}.get(torch.device(device).type, torch.float32)
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is invalid; use one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]
    if torch.device(device).type == "mps" and dtype == torch.bfloat16:
        logger.warning("MPS does not run bfloat16; using float16 instead")
        dtype = torch.float16
    return device, dtype


def resolve_model_path(model_id: str) -> str:
    """Map the embedded aliases to their prepared folders; leave Hub ids and paths as they are."""
    if model_id in EMBEDDED_ALIASES:
        return str(prepare_embedded_model())
    if model_id == SMOLLM2_MODEL_ID:
        return str(prepare_smollm2_model())
    looks_like_path = model_id.startswith((".", "/", "~")) or Path(model_id).expanduser().exists()
    if looks_like_path and not Path(model_id).expanduser().is_dir():
        raise ModelNotFoundError(f"Model folder {model_id!r} not found; pass an existing folder or a Hub model id.")
    return str(Path(model_id).expanduser()) if looks_like_path else model_id


def _hub_error(model_id: str, error: OSError) -> ModelNotFoundError:
    text = str(error)
    if "connect" in text or "offline" in text.lower() or "cached files" in text:
        return ModelNotFoundError(
            f"Model {model_id!r} is not in the local cache and the Hugging Face Hub cannot be reached; "
            f"use --model_id {EMBEDDED_MODEL_ID} (the embedded Gemma-3 270M) or download it where the Hub is reachable."
        )
    return ModelNotFoundError(f"Model {model_id!r} could not be loaded: {text.splitlines()[0]}")


def load_base_model(
    model_id: str,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    with_tokenizer: bool = True,
) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer from a Hub id, a local folder or the embedded alias.

    Only safetensors weights are read; remote code runs only when asked for. Returns
    (model, tokenizer), the tokenizer None when ``with_tokenizer`` is False.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = resolve_device_dtype(device, dtype)
    path = resolve_model_path(model_id)
    logger.info("Loading %s on %s as %s", model_id, device, str(dtype).removeprefix("torch."))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code) if with_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise _hub_error(model_id, error) from error
    model.to(device).eval()
    model.upcycle_base_model = model_id
    return model, tokenizer
