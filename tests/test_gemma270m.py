"""Integration tests on the real Gemma-3 270M weights (the embedded default model)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upcyclebase import load_upcycled, save_upcycled, set_moh, upcycle
from upcyclebase.verify import PROMPTS

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
NUM_HEADS = 4


@pytest.fixture
def prompts(gemma270m_tokenizer):
    return [gemma270m_tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS[:2]]


def _logits(model, prompts):
    with torch.no_grad():
        return [model(ids).logits for ids in prompts]


def _greedy(model, prompts, use_cache=True, new_tokens=32):
    return [
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)
        for ids in prompts
    ]


def test_identity_and_routed_init_match_stock(gemma270m, prompts):
    stock_logits = _logits(gemma270m, prompts)
    stock_tokens = _greedy(gemma270m, prompts)

    upcycle(gemma270m)
    identity = _logits(gemma270m, prompts)
    assert all(torch.equal(a, b) for a, b in zip(identity, stock_logits))

    for router_init in ("original", "interleaved"):
        from upcyclebase.upcycle import reset_router

        reset_router(gemma270m, router_init)
        set_moh(gemma270m, identity_shortcut=False, top_k=NUM_HEADS)
        routed = _logits(gemma270m, prompts)
        for found, expected in zip(routed, stock_logits):
            assert torch.equal(found, expected), (router_init, (found - expected).abs().max())
        tokens = _greedy(gemma270m, prompts)
        assert all(torch.equal(a, b) for a, b in zip(tokens, stock_tokens)), router_init

    set_moh(gemma270m, top_k=NUM_HEADS // 2)
    sparse = _logits(gemma270m, prompts)
    assert max((a - b).abs().max().item() for a, b in zip(sparse, stock_logits)) > 1e-2


def test_cached_routed_generation_matches_uncached(gemma270m, prompts):
    upcycle(gemma270m, router_init="interleaved")
    set_moh(gemma270m, identity_shortcut=False, top_k=3)

    cached = _greedy(gemma270m, prompts[:1], use_cache=True, new_tokens=16)
    uncached = _greedy(gemma270m, prompts[:1], use_cache=False, new_tokens=16)

    assert torch.equal(cached[0], uncached[0])


def test_reload_is_bitwise(gemma270m, gemma270m_path, prompts, tmp_path):
    upcycle(gemma270m, router_init="interleaved")
    set_moh(gemma270m, identity_shortcut=False, top_k=3)
    with torch.no_grad():
        for name, param in gemma270m.named_parameters():
            if "_extra" in name:
                param.add_(torch.randn_like(param) * 1e-3)
    save_upcycled(gemma270m, tmp_path / "adapter", base_model=gemma270m_path)

    reloaded = load_upcycled(tmp_path / "adapter")

    assert all(torch.equal(a, b) for a, b in zip(_logits(reloaded, prompts), _logits(gemma270m, prompts)))


def test_upcycle_command_end_to_end(gemma270m_path, tmp_path):
    output = tmp_path / "upcycled"
    result = subprocess.run(
        [sys.executable, str(REPO / "upcycle_heads.py"), "--model_id", "embedded", "--output_dir", str(output)],
        capture_output=True, text=True, timeout=900,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "FAIL" not in result.stdout
    assert result.stdout.count("PASS") == 6
    assert (output / "upcycle_adapter.safetensors").is_file()
    assert (output / "tokenizer.json").is_file()
