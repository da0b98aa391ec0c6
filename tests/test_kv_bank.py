"""The separate K/V bank (kv_bank="separate"): its own k_proj_extra and v_proj_extra, 2N cached heads.

Tiny Gemma-3 models check the construction, the cache layout, the mix of both banks
against a stock model, the identity shortcut on a cache of both banks, and the fast path
against the dense reference. Tests marked integration repeat identity, cache and
save/load on the real Gemma-3 270M.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_gemma3

from upcyclebase import (
    UpcycleConfig,
    extra_parameters,
    freeze_base_weights,
    load_upcycled,
    moh_modules,
    save_upcycled,
    set_moh,
    upcycle,
)
from upcyclebase.config import CONFIG_NAME

NUM_HEADS = 4
TOLERANCE = 1e-5
EXTRA_PROJECTIONS = ("q_proj_extra", "k_proj_extra", "v_proj_extra", "o_proj_extra")


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    yield


def _ids(batch=2, length=20, seed=1):
    return torch.randint(3, TINY_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _perturb_extras(model, seed=0, names=EXTRA_PROJECTIONS, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moh_modules(model):
            for name in names:
                weight = getattr(module, name).weight
                weight.add_(torch.randn(weight.shape, generator=generator) * scale)


def _randomise_routers(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moh_modules(model):
            module.moh_router.weight.copy_(torch.randn(module.moh_router.weight.shape, generator=generator))
            module.moh_router.bias.copy_(torch.randn(module.moh_router.bias.shape, generator=generator) * 0.1)


def _cached_heads(cache):
    return [layer.keys.shape[1] for layer in cache.layers]


def _set_dense_reference(model, dense):
    for module in moh_modules(model):
        module.moh_dense_reference = dense


def test_extra_kv_projections_are_copies(tiny_model):
    upcycle(tiny_model, kv_bank="separate")

    for module in moh_modules(tiny_model):
        assert module.moh_kv_bank == "separate"
        assert torch.equal(module.k_proj_extra.weight, module.k_proj.weight)
        assert torch.equal(module.v_proj_extra.weight, module.v_proj.weight)
        assert module.k_proj_extra.weight.data_ptr() != module.k_proj.weight.data_ptr()


def test_extra_kv_projections_train_with_frozen_base(tiny_model):
    upcycle(tiny_model, kv_bank="separate", freeze_base=True)
    trainable = {name for name, param in tiny_model.named_parameters() if param.requires_grad}

    assert trainable == set(extra_parameters(tiny_model))
    # per layer: four extra projections and the router's weight and bias
    assert len(trainable) == 2 * 6
    assert sum("k_proj_extra" in name for name in trainable) == 2
    assert sum("v_proj_extra" in name for name in trainable) == 2


def test_shared_bank_has_no_extra_kv(tiny_model):
    upcycle(tiny_model)

    assert not any("k_proj_extra" in name or "v_proj_extra" in name for name in extra_parameters(tiny_model))


def test_invalid_kv_bank_rejected(tiny_model):
    with pytest.raises(ValueError, match=r"kv_bank='both' is invalid"):
        upcycle(tiny_model, kv_bank="both")


def test_config_without_kv_bank_reads_shared():
    config = UpcycleConfig.from_dict({"router_init": "original", "top_k": 2})

    assert config.kv_bank == "shared"


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_cache_holds_both_banks_when_routed(num_kv_heads):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads)
    upcycle(model, kv_bank="separate")
    ids = _ids()

    with torch.no_grad():
        identity_cache = model(ids, use_cache=True).past_key_values
        set_moh(model, identity_shortcut=False)
        routed_cache = model(ids, use_cache=True).past_key_values

    assert _cached_heads(identity_cache) == [num_kv_heads, num_kv_heads]
    assert _cached_heads(routed_cache) == [2 * num_kv_heads, 2 * num_kv_heads]
    # at init the extra keys and values are those of the originals
    for layer in routed_cache.layers:
        torch.testing.assert_close(layer.keys[:, num_kv_heads:], layer.keys[:, :num_kv_heads], rtol=0, atol=TOLERANCE)
        torch.testing.assert_close(layer.values[:, num_kv_heads:], layer.values[:, :num_kv_heads], rtol=0, atol=TOLERANCE)


def _stock_with_selected_bank(model, selected_extra):
    """A stock copy whose head h in layer l has the weights of the bank the router selects for it.

    With one key/value head per query head (MHA), head h of the extra bank reads
    key/value head h of the extra bank, so this stock model computes what the routed
    model should.
    """
    import copy

    stock = copy.deepcopy(model)
    head_dim = model.config.head_dim
    with torch.no_grad():
        for module in moh_modules(stock):
            for head in torch.nonzero(selected_extra(module.layer_idx)).flatten().tolist():
                rows = slice(head * head_dim, (head + 1) * head_dim)
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(module, name).weight[rows] = getattr(module, f"{name}_extra").weight[rows]
                module.o_proj.weight[:, rows] = module.o_proj_extra.weight[:, rows]
            module.set_moh(enabled=False)
    return stock


@pytest.mark.parametrize("dense", [False, True])
def test_mixed_banks_match_stock_with_mha(dense):
    model = make_tiny_gemma3(num_kv_heads=NUM_HEADS)
    upcycle(model, kv_bank="separate", router_init="interleaved")
    _perturb_extras(model)
    set_moh(model, identity_shortcut=False, top_k=NUM_HEADS)
    _set_dense_reference(model, dense)

    # interleaved init selects the extra head h in layer l when (h + l) is odd
    expected = _stock_with_selected_bank(model, lambda layer: (torch.arange(NUM_HEADS) + layer) % 2 == 1)
    ids = _ids()

    torch.testing.assert_close(_logits(model, ids), _logits(expected, ids), rtol=0, atol=TOLERANCE)
    # guards the comparison: the extras changed the output
    assert (_logits(model, ids) - _logits(make_tiny_gemma3(num_kv_heads=NUM_HEADS), ids)).abs().max() > 1e-3


def _layer_inputs(model, length):
    """Random hidden states (1, T, C) and the rotary embedding of positions 0..T-1 for the full-attention layer."""
    hidden = torch.randn(1, length, model.config.hidden_size, generator=torch.Generator().manual_seed(7))
    positions = torch.arange(length).unsqueeze(0)
    cos, sin = model.model.rotary_emb(hidden, positions, layer_type="full_attention")
    return hidden, cos, sin


def _attend(module, hidden, cos, sin, start, end, cache):
    """Run the block on tokens start..end-1 with ``cache`` (causal without a mask: sdpa's is_causal)."""
    output, _ = module(hidden[:, start:end], position_embeddings=(cos[:, start:end], sin[:, start:end]),
                       attention_mask=None, cache=cache)
    return output


def test_identity_shortcut_on_cache_of_both_banks():
    from transformers import DynamicCache

    model = make_tiny_gemma3(num_kv_heads=2)
    upcycle(model, kv_bank="separate")
    _perturb_extras(model)
    _randomise_routers(model)
    set_moh(model, identity_shortcut=False, top_k=3)
    module = next(m for m in moh_modules(model) if not m.is_sliding)
    hidden, cos, sin = _layer_inputs(model, 8)
    cache = DynamicCache(config=model.config)

    with torch.no_grad():
        _attend(module, hidden, cos, sin, 0, 6, cache)
        module.set_moh(identity_shortcut=True)
        identity_step = _attend(module, hidden, cos, sin, 6, 7, cache)
        module.set_moh(identity_shortcut=False)
        routed_step = _attend(module, hidden, cos, sin, 7, 8, cache)

        # references without a cache: the stock block, and the dense reference over all 8 tokens
        stock = module._moh_base_class.forward(module, hidden[:, :7], (cos[:, :7], sin[:, :7]), None)[0]
        dense = module._dense_routed_forward(hidden, (cos, sin), None)[0]

    assert cache.layers[module.layer_idx].keys.shape[1] == 4
    torch.testing.assert_close(identity_step[:, 0], stock[:, 6], rtol=0, atol=TOLERANCE)
    # the routed step needs the extra bank's keys and values that the identity step cached
    torch.testing.assert_close(routed_step[:, 0], dense[:, 7], rtol=0, atol=TOLERANCE)


def test_routed_step_on_original_cache_rejected():
    model = make_tiny_gemma3(num_kv_heads=1)
    upcycle(model, kv_bank="separate")
    ids = _ids(1, 8)
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values

    set_moh(model, identity_shortcut=False)

    with pytest.raises(ValueError, match=r"contains 1 key/value heads, but routed attention with kv_bank='separate' writes 2"):
        with torch.no_grad():
            model(ids[:, 6:7], cache=cache, use_cache=True)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("gate_mode", ["hard", "renorm"])
def test_fast_path_matches_dense_every_top_k(num_kv_heads, gate_mode):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads)
    upcycle(model, kv_bank="separate", gate_mode=gate_mode, identity_shortcut=False)
    _perturb_extras(model)
    _randomise_routers(model)
    ids = _ids()

    for top_k in range(1, 2 * NUM_HEADS + 1):
        set_moh(model, top_k=top_k)
        fast = _logits(model, ids)
        _set_dense_reference(model, True)
        dense = _logits(model, ids)
        _set_dense_reference(model, False)
        torch.testing.assert_close(fast, dense, rtol=0, atol=TOLERANCE, msg=lambda text: f"top_k={top_k}: {text}")


def _decode_logits(model, ids, attention_mask, prefill=12):
    """Logits of a prefill, then of each later token decoded one at a time with the cache."""
    output = model(ids[:, :prefill], attention_mask=attention_mask[:, :prefill], use_cache=True)
    steps, cache = [output.logits], output.past_key_values
    for position in range(prefill, ids.shape[1]):
        output = model(ids[:, position : position + 1], attention_mask=attention_mask[:, : position + 1], cache=cache,
                       use_cache=True)
        cache = output.past_key_values
        steps.append(output.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_padded_cached_decoding_matches_dense(num_kv_heads):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads)
    upcycle(model, kv_bank="separate", identity_shortcut=False, top_k=3)
    _perturb_extras(model)
    _randomise_routers(model)
    ids = _ids(3, 22)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0  # left padding, as for generation
    attention_mask[2, :11] = 0  # more padding than the sliding window of 8
    ids = ids.masked_fill(attention_mask == 0, 0)
    real = attention_mask.bool()

    with torch.no_grad():
        fast = _decode_logits(model, ids, attention_mask)
        _set_dense_reference(model, True)
        dense = _decode_logits(model, ids, attention_mask)
        uncached = _logits(model, ids, attention_mask=attention_mask)

    torch.testing.assert_close(fast[real], dense[real], rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(dense[real], uncached[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gradients_match_dense(num_kv_heads):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads)
    upcycle(model, kv_bank="separate", identity_shortcut=False, top_k=5, freeze_base=True)
    _perturb_extras(model)
    _randomise_routers(model)
    model.train()
    ids = _ids()

    def gradients():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    fast = gradients()
    _set_dense_reference(model, True)
    dense = gradients()

    assert fast.keys() == dense.keys() == set(extra_parameters(model))
    assert all(fast[name].abs().max() > 0 for name in fast if "k_proj_extra" in name or "v_proj_extra" in name)
    for name in fast:
        torch.testing.assert_close(fast[name], dense[name], rtol=1e-4, atol=TOLERANCE, msg=lambda text: f"{name}: {text}")


# Real Gemma-3 270M: 4 query heads, 1 key/value head


@pytest.fixture
def prompts(gemma270m_tokenizer):
    from upcyclebase.verify import PROMPTS

    return [gemma270m_tokenizer(text, return_tensors="pt").input_ids for text in PROMPTS[:2]]


def _greedy(model, ids, new_tokens=16):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


@pytest.mark.integration
def test_gemma270m_identity_and_routed_init(gemma270m, prompts):
    stock_logits = [_logits(gemma270m, ids) for ids in prompts]
    stock_tokens = _greedy(gemma270m, prompts[0])

    upcycle(gemma270m, kv_bank="separate", router_init="interleaved")
    identity = [_logits(gemma270m, ids) for ids in prompts]
    identity_tokens = _greedy(gemma270m, prompts[0])
    set_moh(gemma270m, identity_shortcut=False)
    routed = [_logits(gemma270m, ids) for ids in prompts]
    routed_output = gemma270m(prompts[0], use_cache=True)
    routed_tokens = _greedy(gemma270m, prompts[0])

    assert all(torch.equal(found, expected) for found, expected in zip(identity, stock_logits))
    assert torch.equal(identity_tokens, stock_tokens)
    for found, expected in zip(routed, stock_logits):
        torch.testing.assert_close(found, expected, rtol=0, atol=1e-4)
    assert torch.equal(routed_tokens, stock_tokens)
    assert set(_cached_heads(routed_output.past_key_values)) == {2}


@pytest.mark.integration
def test_gemma270m_cached_generation_matches_uncached(gemma270m, prompts):
    upcycle(gemma270m, kv_bank="separate", router_init="interleaved")
    _perturb_extras(gemma270m, scale=1e-3)
    set_moh(gemma270m, identity_shortcut=False, top_k=3)

    prompt = prompts[0]

    cached = gemma270m.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, use_cache=True,
                                output_logits=True, return_dict_in_generate=True)
    # One uncached forward over the generated sequence gives every step's logits at once
    uncached = _logits(gemma270m, cached.sequences)[0, prompt.shape[1] - 1 : -1]

    torch.testing.assert_close(torch.cat(cached.logits), uncached, rtol=0, atol=1e-4)
    # Greedy generation without a cache picks the same tokens. The returned logits are raw,
    # so the end-of-sequence token that min_new_tokens rules out is masked here too.
    uncached[:, gemma270m.generation_config.eos_token_id] = float("-inf")
    assert torch.equal(uncached.argmax(dim=-1), cached.sequences[0, prompt.shape[1] :])


@pytest.mark.integration
def test_gemma270m_reload_is_bitwise(gemma270m, gemma270m_path, prompts, tmp_path):
    import json

    upcycle(gemma270m, kv_bank="separate", router_init="interleaved")
    _perturb_extras(gemma270m, scale=1e-3)
    set_moh(gemma270m, identity_shortcut=False, top_k=3)
    save_upcycled(gemma270m, tmp_path / "adapter", base_model=gemma270m_path)

    reloaded = load_upcycled(tmp_path / "adapter")

    record = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert record["upcycle"]["kv_bank"] == "separate"
    assert all(module.moh_kv_bank == "separate" for module in moh_modules(reloaded))
    for ids in prompts:
        assert torch.equal(_logits(reloaded, ids), _logits(gemma270m, ids))
