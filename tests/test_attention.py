"""Routed attention on tiny Gemma-3 models: identity, routing, gates, cache and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_gemma3
from reference_attention import reference_block

from upcyclebase import extra_parameters, freeze_base_weights, moh_modules, set_moh, upcycle
from upcyclebase.router import route

NUM_HEADS = 4


def _randomise_routers(model, seed: int = 0, scale: float = 1.0) -> None:
    """Give routers trained-looking weights so that selections vary from token to token."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moh_modules(model):
            router = module.moh_router
            router.weight.copy_(torch.randn(router.weight.shape, generator=generator) * scale)
            router.bias.copy_(torch.randn(router.bias.shape, generator=generator) * 0.1)


def _perturb_extras(model, seed: int = 0) -> None:
    """Make the extra bank differ from the original so that choosing it matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moh_modules(model):
            for linear in (module.q_proj_extra, module.o_proj_extra):
                linear.weight.add_(torch.randn(linear.weight.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_identity_shortcut_bitwise(num_kv_heads, tiny_ids):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads)
    with torch.no_grad():
        stock = model(tiny_ids).logits
    stock_tokens = model.generate(tiny_ids[:1], max_new_tokens=12, do_sample=False)

    upcycle(model)
    _perturb_extras(model)
    _randomise_routers(model)
    with torch.no_grad():
        found = model(tiny_ids).logits

    assert torch.equal(found, stock)
    assert torch.equal(model.generate(tiny_ids[:1], max_new_tokens=12, do_sample=False), stock_tokens)


def test_upcycle_defaults(tiny_model):
    upcycle(tiny_model)
    modules = list(moh_modules(tiny_model))

    assert len(modules) == 2
    assert all(m.moh_enabled and m.moh_identity_shortcut for m in modules)
    assert all(m.moh_top_k == NUM_HEADS for m in modules)
    assert tiny_model.config.num_attention_heads == NUM_HEADS


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("router_init", ["original", "interleaved"])
@pytest.mark.parametrize("gate_mode", ["hard", "renorm"])
@pytest.mark.parametrize("kv_bank", ["shared", "separate"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_routed_at_init_matches_stock_bitwise(num_kv_heads, router_init, gate_mode, kv_bank, attn_implementation, tiny_ids):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads, attn_implementation=attn_implementation)
    with torch.no_grad():
        stock = model(tiny_ids).logits
    stock_tokens = model.generate(tiny_ids[:1], max_new_tokens=12, do_sample=False)

    upcycle(model, router_init=router_init, gate_mode=gate_mode, kv_bank=kv_bank)
    set_moh(model, identity_shortcut=False, top_k=NUM_HEADS)
    with torch.no_grad():
        found = model(tiny_ids).logits

    assert torch.equal(found, stock), (found - stock).abs().max()
    assert torch.equal(model.generate(tiny_ids[:1], max_new_tokens=12, do_sample=False), stock_tokens)


def test_interleaved_init_selects_extras(tiny_model, tiny_ids):
    upcycle(tiny_model, router_init="interleaved")
    set_moh(tiny_model, identity_shortcut=False)
    for module in moh_modules(tiny_model):
        module.moh_record_routing = True
    with torch.no_grad():
        tiny_model(tiny_ids)

    for module in moh_modules(tiny_model):
        mask = module.moh_last_routing.mask
        assert mask.sum(-1).eq(NUM_HEADS).all()
        assert mask[..., NUM_HEADS:].any()
        # each pair (h, h+H) has exactly one of its two heads selected
        assert (mask[..., :NUM_HEADS] ^ mask[..., NUM_HEADS:]).all()


def test_sparser_top_k_differs_from_stock(tiny_model, tiny_ids):
    with torch.no_grad():
        stock = tiny_model(tiny_ids).logits
    upcycle(tiny_model)
    set_moh(tiny_model, identity_shortcut=False, top_k=NUM_HEADS // 2)
    with torch.no_grad():
        found = tiny_model(tiny_ids).logits

    assert torch.isfinite(found).all()
    assert (found - stock).abs().max() > 1e-3


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("gate_mode", ["hard", "renorm"])
@pytest.mark.parametrize("top_k", [1, 3, 4, 7, 8])
def test_routed_block_matches_reference(num_kv_heads, gate_mode, top_k):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads)
    upcycle(model, gate_mode=gate_mode)
    _perturb_extras(model)
    _randomise_routers(model)
    set_moh(model, identity_shortcut=False, top_k=top_k)

    captured = {}

    def keep(module, args, kwargs, output):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"], output[0])

    handles = [m.register_forward_hook(keep, with_kwargs=True) for m in moh_modules(model)]
    ids = torch.randint(3, TINY_VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()

    for module in moh_modules(model):
        hidden, (cos, sin), output = captured[module.layer_idx]
        expected = reference_block(module, hidden[0], cos[0], sin[0], top_k, gate_mode)
        torch.testing.assert_close(output[0].double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, True, "4"])
def test_top_k_out_of_range_rejected(tiny_model, bad):
    upcycle(tiny_model)
    set_moh(tiny_model, top_k=3)

    with pytest.raises(ValueError, match=r"top_k=.* from 1 to 8"):
        set_moh(tiny_model, top_k=bad)
    assert all(m.moh_top_k == 3 for m in moh_modules(tiny_model))


def test_module_set_moh_as_documented(tiny_model, tiny_ids):
    with torch.no_grad():
        stock = tiny_model(tiny_ids).logits
    upcycle(tiny_model, router_init="interleaved")
    for module in tiny_model.modules():
        if hasattr(module, "set_moh"):
            module.set_moh(enabled=True, identity_shortcut=False, top_k=NUM_HEADS)

    assert all(m.moh_routed for m in moh_modules(tiny_model))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(tiny_ids).logits, stock, rtol=0, atol=1e-5)


def test_disabled_routing_runs_original(tiny_model, tiny_ids):
    with torch.no_grad():
        stock = tiny_model(tiny_ids).logits
    upcycle(tiny_model)
    _perturb_extras(tiny_model)
    set_moh(tiny_model, enabled=False, identity_shortcut=False)

    with torch.no_grad():
        assert torch.equal(tiny_model(tiny_ids).logits, stock)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("gate_mode", ["hard", "renorm"])
def test_cached_generation_matches_uncached(num_kv_heads, gate_mode):
    model = make_tiny_gemma3(num_kv_heads=num_kv_heads)
    upcycle(model, gate_mode=gate_mode)
    _perturb_extras(model)
    _randomise_routers(model)
    set_moh(model, identity_shortcut=False, top_k=3)
    prompt = torch.randint(3, TINY_VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))

    # 20 new tokens cross the sliding window of 8
    cached = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=True,
                            output_logits=True, return_dict_in_generate=True)
    uncached = model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, use_cache=False)

    assert torch.equal(cached.sequences, uncached)
    with torch.no_grad():
        full = model(cached.sequences).logits[0, prompt.shape[1] - 1:-1]
    step_logits = torch.cat(cached.logits, dim=0)
    torch.testing.assert_close(step_logits, full, rtol=0, atol=1e-4)


def test_routing_is_active_with_cache(tiny_model):
    upcycle(tiny_model)
    _randomise_routers(tiny_model)
    set_moh(tiny_model, identity_shortcut=False, top_k=3)
    for module in moh_modules(tiny_model):
        module.moh_record_routing = True
    prompt = torch.randint(3, TINY_VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))

    tiny_model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True)

    for module in moh_modules(tiny_model):
        # the last decoding step routed a single token
        assert module.moh_last_routing.mask.shape == (1, 1, 2 * NUM_HEADS)
        assert module.moh_last_routing.mask.sum() == 3


def _loss(model, ids):
    return model(ids, labels=ids).loss


def test_gradients_reach_only_extras_when_routed(tiny_model, tiny_ids):
    upcycle(tiny_model, router_init="interleaved", freeze_base=True)
    set_moh(tiny_model, identity_shortcut=False)
    tiny_model.train()

    _loss(tiny_model, tiny_ids).backward()

    extras = extra_parameters(tiny_model)
    for name, param in tiny_model.named_parameters():
        if name in extras:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


def test_router_gets_gradient_with_original_init(tiny_model, tiny_ids):
    upcycle(tiny_model, router_init="original", freeze_base=True)
    set_moh(tiny_model, identity_shortcut=False)

    _loss(tiny_model, tiny_ids).backward()

    for module in moh_modules(tiny_model):
        assert module.moh_router.weight.grad.abs().sum() > 0
        # unselected extra heads contribute nothing, so they get no gradient
        assert module.q_proj_extra.weight.grad is None or module.q_proj_extra.weight.grad.abs().sum() == 0


def test_identity_shortcut_gives_extras_no_gradient(tiny_model, tiny_ids):
    upcycle(tiny_model, router_init="interleaved")
    tiny_model.train()

    _loss(tiny_model, tiny_ids).backward()

    for name, param in extra_parameters(tiny_model).items():
        assert param.grad is None, name


def test_freeze_base_leaves_extras_trainable(tiny_model):
    upcycle(tiny_model, freeze_base=True)
    trainable = {name for name, param in tiny_model.named_parameters() if param.requires_grad}

    assert trainable == set(extra_parameters(tiny_model))
    assert all("_extra" in name or "moh_router" in name for name in trainable)
    # per layer: q_proj_extra and o_proj_extra weights, router weight and bias
    assert len(trainable) == 2 * 4


@pytest.mark.parametrize("top_k", [1, 3, 4, 7, 49])
def test_gates_exactly_one_for_equal_logits(top_k):
    logits = torch.zeros(2, 5, 64)
    logits[..., :top_k] = 1.0

    for gate_mode in ("hard", "renorm"):
        routing = route(logits, top_k, gate_mode)
        selected = routing.gates[routing.mask]
        assert torch.equal(selected, torch.ones_like(selected)), gate_mode
        assert routing.mask[..., :top_k].all()


def test_upcycle_twice_rejected(tiny_model):
    upcycle(tiny_model)
    with pytest.raises(ValueError, match="already upcycled"):
        upcycle(tiny_model)


def test_unsupported_model_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match=r"supported families: gemma3 \(Gemma3Attention\), .*llama"):
        upcycle(model)


def test_eager_attention_matches_sdpa(tiny_ids):
    results = {}
    for implementation in ("eager", "sdpa"):
        model = make_tiny_gemma3(attn_implementation=implementation)
        upcycle(model)
        _perturb_extras(model)
        _randomise_routers(model)
        set_moh(model, identity_shortcut=False, top_k=3)
        with torch.no_grad():
            results[implementation] = model(tiny_ids).logits

    torch.testing.assert_close(results["eager"], results["sdpa"], rtol=0, atol=1e-5)
