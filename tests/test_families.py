"""Upcycling every supported family on tiny models built from its transformers config.

Each family is checked against its own stock transformers model, with the shared and the
separate K/V bank. The identity shortcut must match it bitwise and routed attention at
init up to rounding. The extra bank alone must match a stock model that has the extra
bank's weights. Cached generation must match uncached, the fast path the dense reference,
and a reloaded model the saved one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_gemma3
from test_multimodal import _tiny_multimodal

from upcyclebase import load_upcycled, moh_modules, save_upcycled, set_moh, upcycle
from upcyclebase.config import KV_BANKS, ROUTER_INITS
from upcyclebase.families import FAMILIES

NUM_HEADS = 4
TOLERANCE = 1e-5
# Below the image token ids of the tiny multimodal model (125..127)
MAX_TOKEN_ID = 120


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    yield


def _tiny_config(config_cls, attn_implementation: str = "sdpa", **overrides):
    """Two layers, 4 query heads over 2 key/value heads, head_dim 16 != hidden / heads."""
    settings = dict(
        vocab_size=TINY_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(overrides)
    config = config_cls(**settings)
    config._attn_implementation = attn_implementation
    return config


def _build(model_cls, config, seed: int = 0):
    """A model with random weights; norm weights and biases, which start at constants, get noise too."""
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def _gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # Soft-capping runs in the eager attention only (sdpa rejects it)
    config = _tiny_config(Gemma2Config, "eager", query_pre_attn_scalar=16, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0)
    model = _build(Gemma2ForCausalLM, config)
    # Attention logits of random weights stay far below the cap of 5; queries 100x larger
    # reach it, so that leaving out the cap changes the output logits by about 0.1
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(100.0)
    return model


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama 3's RoPE scaling; biases on every projection, so that o_proj's bias must count once
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    return _build(LlamaForCausalLM, _tiny_config(LlamaConfig, attention_bias=True, rope_parameters=rope))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # q, k and v with biases; layer 1 slides over a window of 8
    config = _tiny_config(Qwen2Config, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    return _build(Qwen2ForCausalLM, config)


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _build(Qwen3ForCausalLM, _tiny_config(Qwen3Config))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return _build(MistralForCausalLM, _tiny_config(MistralConfig, sliding_window=8))


# family name (as in upcyclebase.families) -> builder of a tiny model, same weights on every call
BUILDERS = {
    "gemma3": lambda: make_tiny_gemma3(num_kv_heads=2),
    "gemma3-multimodal": _tiny_multimodal,
    "gemma2": _gemma2,
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
}
NAMES = list(BUILDERS)


def _ids(batch: int = 2, length: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, MAX_TOKEN_ID, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def _greedy(model, prompt, new_tokens=20, **kwargs):
    return model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


def _perturb_extras(model, seed: int = 0) -> None:
    """Make every extra projection differ from the original it was copied from."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moh_modules(model):
            for name in ("q_proj_extra", "k_proj_extra", "v_proj_extra", "o_proj_extra"):
                if hasattr(module, name):
                    weight = getattr(module, name).weight
                    weight.add_(torch.randn(weight.shape, generator=generator) * 0.05)


def _randomise_routers(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moh_modules(model):
            module.moh_router.weight.copy_(torch.randn(module.moh_router.weight.shape, generator=generator))
            module.moh_router.bias.copy_(torch.randn(module.moh_router.bias.shape, generator=generator) * 0.1)


def _routed_model(name, kv_bank, top_k=3):
    """A tiny upcycled model with a perturbed extra bank and a random router, routed."""
    model = BUILDERS[name]()
    upcycle(model, kv_bank=kv_bank)
    _perturb_extras(model)
    _randomise_routers(model)
    set_moh(model, identity_shortcut=False, top_k=top_k)
    return model


def test_every_family_has_a_builder():
    families = {family.name for family in FAMILIES}

    assert families <= {name.split("-")[0] for name in BUILDERS}


@pytest.mark.parametrize("name", NAMES)
def test_family_is_upcycled(name):
    model = BUILDERS[name]()
    family_name = name.split("-")[0]

    upcycle(model)

    modules = list(moh_modules(model))
    assert len(modules) == 2
    assert all(module._moh_family.name == family_name for module in modules)
    # preflight accepts a model by this model_type before loading its weights
    assert modules[0]._moh_family.model_type == model.config.get_text_config().model_type


@pytest.mark.parametrize("kv_bank", KV_BANKS)
@pytest.mark.parametrize("name", NAMES)
def test_identity_shortcut_bitwise(name, kv_bank):
    model = BUILDERS[name]()
    ids = _ids()
    stock = _logits(model, ids)
    stock_tokens = _greedy(model, ids[:1, :6])

    upcycle(model, kv_bank=kv_bank)
    _perturb_extras(model)
    _randomise_routers(model)

    assert torch.equal(_logits(model, ids), stock)
    assert torch.equal(_greedy(model, ids[:1, :6]), stock_tokens)


@pytest.mark.parametrize("router_init", ROUTER_INITS)
@pytest.mark.parametrize("kv_bank", KV_BANKS)
@pytest.mark.parametrize("name", NAMES)
def test_routed_at_init_matches_stock(name, kv_bank, router_init):
    model = BUILDERS[name]()
    ids = _ids()
    stock = _logits(model, ids)

    upcycle(model, kv_bank=kv_bank, router_init=router_init)
    set_moh(model, identity_shortcut=False, top_k=NUM_HEADS)

    assert torch.equal(_logits(model, ids), stock)


def _stock_with_extra_weights(model, kv_bank):
    """A stock copy of an upcycled model whose projections hold the extra bank's weights."""
    stock = copy.deepcopy(model)
    pairs = [("q_proj", "q_proj_extra"), ("o_proj", "o_proj_extra")]
    if kv_bank == "separate":
        pairs += [("k_proj", "k_proj_extra"), ("v_proj", "v_proj_extra")]
    with torch.no_grad():
        for module in moh_modules(stock):
            for original, extra in pairs:
                getattr(module, original).weight.copy_(getattr(module, extra).weight)
            module.set_moh(enabled=False)
    return stock


@pytest.mark.parametrize("kv_bank", KV_BANKS)
@pytest.mark.parametrize("name", NAMES)
def test_extra_bank_alone_matches_stock(name, kv_bank):
    model = BUILDERS[name]()
    upcycle(model, kv_bank=kv_bank)
    _perturb_extras(model)
    expected = _stock_with_extra_weights(model, kv_bank)
    # Router bias +1 on the extras, -1 on the originals: every token selects the H extra heads
    with torch.no_grad():
        for module in moh_modules(model):
            module.moh_router.bias.copy_(torch.cat([-torch.ones(NUM_HEADS), torch.ones(NUM_HEADS)]))
    set_moh(model, identity_shortcut=False, top_k=NUM_HEADS)
    ids = _ids()

    torch.testing.assert_close(_logits(model, ids), _logits(expected, ids), rtol=0, atol=TOLERANCE)
    # the originals alone are the stock model, which the extra weights changed
    assert (_logits(model, ids) - _logits(BUILDERS[name](), ids)).abs().max() > 1e-3


@pytest.mark.parametrize("kv_bank", KV_BANKS)
@pytest.mark.parametrize("name", NAMES)
def test_cached_generation_matches_uncached(name, kv_bank):
    model = _routed_model(name, kv_bank)
    prompt = _ids(1, 6, seed=5)

    # 20 new tokens cross the sliding window of 8
    cached = _greedy(model, prompt, use_cache=True, output_logits=True, return_dict_in_generate=True)
    uncached = _greedy(model, prompt, use_cache=False)

    assert torch.equal(cached.sequences, uncached)
    full = _logits(model, cached.sequences)[0, prompt.shape[1] - 1 : -1]
    torch.testing.assert_close(torch.cat(cached.logits, dim=0), full, rtol=0, atol=1e-4)


def _set_dense_reference(model, dense: bool) -> None:
    for module in moh_modules(model):
        module.moh_dense_reference = dense


@pytest.mark.parametrize("kv_bank", KV_BANKS)
@pytest.mark.parametrize("name", NAMES)
def test_fast_path_matches_dense(name, kv_bank):
    model = _routed_model(name, kv_bank)
    ids = _ids()

    for top_k in (1, 3, 4, 8):
        set_moh(model, top_k=top_k)
        fast = _logits(model, ids)
        _set_dense_reference(model, True)
        dense = _logits(model, ids)
        _set_dense_reference(model, False)
        torch.testing.assert_close(fast, dense, rtol=0, atol=TOLERANCE, msg=lambda text: f"top_k={top_k}: {text}")


@pytest.mark.parametrize("kv_bank", KV_BANKS)
@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, kv_bank, tmp_path):
    model = _routed_model(name, kv_bank)
    save_upcycled(model, tmp_path / "adapter", base_model="unused")

    reloaded = load_upcycled(tmp_path / "adapter", base_model=BUILDERS[name]())

    ids = _ids()
    assert torch.equal(_logits(reloaded, ids), _logits(model, ids))
    assert reloaded.upcycle_config.kv_bank == kv_bank
    for module in moh_modules(reloaded):
        assert module.moh_kv_bank == kv_bank
        assert hasattr(module, "k_proj_extra") == (kv_bank == "separate")
