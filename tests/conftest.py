"""Shared fixtures: tiny Gemma-3 models built from a config in code, and the real Gemma-3 270M."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY_VOCAB = 128


def tiny_gemma3_config(num_kv_heads: int = 1, attn_implementation: str = "sdpa", **overrides):
    """Two layers (one sliding with a window of 8, one full), 4 query heads, head_dim 16 != hidden/heads."""
    from transformers import Gemma3TextConfig

    settings = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    config = Gemma3TextConfig(**settings)
    config._attn_implementation = attn_implementation
    return config


def make_tiny_gemma3(seed: int = 0, **config_overrides):
    """A randomly initialised Gemma3ForCausalLM in eval mode; norms get random weights too."""
    from transformers import Gemma3ForCausalLM

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(tiny_gemma3_config(**config_overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Run tiny models on one thread: their matmuls are too small to gain from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    return make_tiny_gemma3()


@pytest.fixture
def tiny_ids():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, TINY_VOCAB, (2, 20), generator=generator)


@pytest.fixture(scope="session")
def gemma270m_path() -> str:
    """The real Gemma-3 270M as a Hugging Face folder (converted from the packaged GGUF once)."""
    from upcyclebase.embedded import prepare_embedded_model

    return str(prepare_embedded_model())


@pytest.fixture(scope="session")
def gemma270m_tokenizer(gemma270m_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gemma270m_path)


@pytest.fixture
def gemma270m(gemma270m_path):
    """A fresh fp32 copy of the real model per test (loads in a few seconds)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma270m_path, dtype=torch.float32).eval()
