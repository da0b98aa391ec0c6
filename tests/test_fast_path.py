"""The selected-heads fast path against the dense reference (all 2H heads, unselected gated to 0).

Every model here has a trained-looking router (random weights, so tokens pick different
heads) and an extra bank that differs from the original, so a row sent to the wrong
head, bank, slot or key/value group changes the output.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VOCAB, make_tiny_gemma3
from upcyclebase import moh_modules, set_moh, upcycle
from upcyclebase.config import GATE_MODES, ROUTER_INITS
from upcyclebase.selected_heads import plan_rows, uniform_selection

TOLERANCE = 1e-5
NUM_HEADS = 4  # query heads of the tiny model, so top_k runs 1..8


@pytest.fixture(autouse=True, scope="module")
def _tiny_models_on_one_thread(one_thread):
    yield


def make_routed_model(num_kv_heads=1, seed=0, attn_implementation="sdpa", **settings):
    """A tiny upcycled Gemma-3 with random router weights and a perturbed extra bank, routed."""
    model = make_tiny_gemma3(seed=seed, num_kv_heads=num_kv_heads, attn_implementation=attn_implementation)
    upcycle(model, identity_shortcut=False, **settings)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for module in moh_modules(model):
            module.moh_router.weight.normal_(0.0, 1.0, generator=generator)
            for proj in (module.q_proj_extra, module.o_proj_extra):
                proj.weight.add_(torch.randn(proj.weight.shape, generator=generator) * 0.05)
    return model


def set_dense_reference(model, dense: bool) -> None:
    for module in moh_modules(model):
        module.moh_dense_reference = dense


def both_paths(model, run):
    """``run(model)`` through the fast path, then through the dense reference."""
    set_dense_reference(model, False)
    fast = run(model)
    set_dense_reference(model, True)
    dense = run(model)
    set_dense_reference(model, False)
    return fast, dense


def random_ids(batch, length, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY_VOCAB, (batch, length), generator=generator)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("router_init", ROUTER_INITS)
def test_forward_matches_dense_every_top_k(num_kv_heads, gate_mode, router_init):
    model = make_routed_model(num_kv_heads, router_init=router_init, gate_mode=gate_mode)
    ids = random_ids(2, 20)  # longer than the sliding window of 8

    for top_k in range(1, 2 * NUM_HEADS + 1):
        set_moh(model, top_k=top_k)
        with torch.no_grad():
            fast, dense = both_paths(model, lambda m: m(ids).logits)
        torch.testing.assert_close(fast, dense, atol=TOLERANCE, rtol=0, msg=lambda text: f"top_k={top_k}: {text}")


def test_routing_varies_per_token():
    model = make_routed_model()
    set_moh(model, top_k=NUM_HEADS)
    for module in moh_modules(model):
        module.moh_record_routing = True
    with torch.no_grad():
        model(random_ids(2, 20))

    for module in moh_modules(model):
        mask = module.moh_last_routing.mask.reshape(-1, 2 * NUM_HEADS)
        assert len(torch.unique(mask, dim=0)) > 4, f"layer {module.layer_idx} routes too few distinct head sets"
        assert mask[:, NUM_HEADS:].any(), f"layer {module.layer_idx} never selects an extra head"


def test_fast_path_differs_from_stock():
    """Guards the comparison above: routed outputs must not simply equal the stock model's."""
    model = make_routed_model()
    ids = random_ids(2, 20)
    with torch.no_grad():
        routed = model(ids).logits
        set_moh(model, identity_shortcut=True)
        stock = model(ids).logits
    assert (routed - stock).abs().max() > 1e-3


def test_eager_attention_matches_dense():
    model = make_routed_model(num_kv_heads=2, attn_implementation="eager")
    ids = random_ids(2, 20)
    for top_k in (1, 3, 8):
        set_moh(model, top_k=top_k)
        with torch.no_grad():
            fast, dense = both_paths(model, lambda m: m(ids).logits)
        torch.testing.assert_close(fast, dense, atol=TOLERANCE, rtol=0, msg=lambda text: f"top_k={top_k}: {text}")


def decode_logits(model, ids, attention_mask=None, prefill=12):
    """Logits of a prefill of ``prefill`` tokens, then of each later token decoded one at a time with the cache."""
    output = model(ids[:, :prefill], attention_mask=None if attention_mask is None else attention_mask[:, :prefill], use_cache=True)
    steps = [output.logits]
    cache = output.past_key_values
    for position in range(prefill, ids.shape[1]):
        step_mask = None if attention_mask is None else attention_mask[:, : position + 1]
        output = model(ids[:, position : position + 1], attention_mask=step_mask, cache=cache, use_cache=True)
        cache = output.past_key_values
        steps.append(output.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("top_k", [1, 3, 4, 8])
def test_cached_decoding_matches_dense(num_kv_heads, top_k):
    model = make_routed_model(num_kv_heads, gate_mode="renorm", router_init="interleaved")
    set_moh(model, top_k=top_k)
    ids = random_ids(2, 22)  # 12 prefill + 10 decode steps, past the sliding window of 8

    with torch.no_grad():
        fast, dense = both_paths(model, lambda m: decode_logits(m, ids))
        uncached = model(ids).logits

    torch.testing.assert_close(fast, dense, atol=TOLERANCE, rtol=0)
    # The cached fast path also agrees with one uncached forward over the whole sequence
    torch.testing.assert_close(fast, uncached, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_padded_batch_matches_dense(num_kv_heads):
    model = make_routed_model(num_kv_heads)
    set_moh(model, top_k=3)
    ids = random_ids(3, 20)
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :5] = 0  # left padding, as for generation
    attention_mask[2, :11] = 0  # more padding than the sliding window
    ids = ids.masked_fill(attention_mask == 0, 0)

    with torch.no_grad():
        fast, dense = both_paths(model, lambda m: m(ids, attention_mask=attention_mask).logits)
        fast_cached, dense_cached = both_paths(model, lambda m: decode_logits(m, ids, attention_mask))

    real = attention_mask.bool()
    torch.testing.assert_close(fast[real], dense[real], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(fast_cached[real], dense_cached[real], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("top_k", [2, 4, 7])
def test_gradients_match_dense(num_kv_heads, gate_mode, top_k):
    model = make_routed_model(num_kv_heads, gate_mode=gate_mode)
    set_moh(model, top_k=top_k)
    model.train()
    ids = random_ids(2, 20)

    def gradients(m):
        m.zero_grad(set_to_none=True)
        logits = m(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, TINY_VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        return {name: param.grad.clone() for name, param in m.named_parameters() if param.grad is not None}

    fast, dense = both_paths(model, gradients)

    assert fast.keys() == dense.keys()
    extra_names = [name for name in fast if "_extra" in name or "moh_router" in name]
    assert len(extra_names) == 2 * 4  # 2 layers x (q_proj_extra, o_proj_extra, router weight, router bias)
    assert any(fast[name].abs().max() > 0 for name in extra_names if "moh_router" in name)
    for name in fast:
        torch.testing.assert_close(fast[name], dense[name], atol=TOLERANCE, rtol=1e-4, msg=lambda text: f"{name}: {text}")


def make_uniform_model(num_kv_heads, seed, **settings):
    """A routed model whose router ignores the token: a zero weight and a random bias, so every token picks the same heads."""
    model = make_routed_model(num_kv_heads, seed=seed, **settings)
    generator = torch.Generator().manual_seed(seed + 200)
    with torch.no_grad():
        for module in moh_modules(model):
            module.moh_router.weight.zero_()
            module.moh_router.bias.copy_(torch.randn(2 * NUM_HEADS, generator=generator))
    return model


@pytest.mark.parametrize("num_kv_heads", [1, 2])
@pytest.mark.parametrize("kv_bank", ["shared", "separate"])
@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_uniform_selection_matches_dense_every_top_k(num_kv_heads, kv_bank, gate_mode):
    ids = random_ids(2, 20)
    for seed in range(3):  # three different head sets per top_k
        model = make_uniform_model(num_kv_heads, seed, kv_bank=kv_bank, gate_mode=gate_mode)
        for top_k in range(1, 2 * NUM_HEADS + 1):
            set_moh(model, top_k=top_k)
            with torch.no_grad():
                fast, dense = both_paths(model, lambda m: m(ids).logits)
            torch.testing.assert_close(
                fast, dense, atol=TOLERANCE, rtol=0, msg=lambda text: f"seed={seed} top_k={top_k}: {text}"
            )


@pytest.mark.parametrize("kv_bank", ["shared", "separate"])
def test_uniform_selection_gradients_match_dense(kv_bank):
    model = make_uniform_model(2, seed=0, kv_bank=kv_bank, gate_mode="renorm")
    set_moh(model, top_k=5)
    model.train()
    ids = random_ids(2, 20)

    def gradients(m):
        m.zero_grad(set_to_none=True)
        m(ids).logits.square().mean().backward()
        return {name: param.grad.clone() for name, param in m.named_parameters() if param.grad is not None}

    fast, dense = both_paths(model, gradients)

    assert fast.keys() == dense.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], dense[name], atol=TOLERANCE, rtol=1e-4, msg=lambda text: f"{name}: {text}")


def test_uniform_selection_orders_heads():
    # 4 query heads over 2 key/value heads: originals 0, 1 and extras 4, 5 read key/value head 0
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, [1, 4, 7, 3]] = True
    selection = uniform_selection(mask, num_kv_heads=2)
    assert selection.output_order == [4, 1, 3, 7]
    assert selection.attention_order == [4, 1, 3, 7]
    assert selection.slots_per_group == 2
    assert selection.kv_heads is None

    # A separate bank reads key/value heads 0, 1 (originals) and 2, 3 (extras)
    selection = uniform_selection(mask, num_kv_heads=2, kv_bank="separate")
    assert selection.attention_order == [1, 3, 4, 7]
    assert selection.slots_per_group == 1
    assert selection.kv_heads is None

    # Unequal heads per key/value head, or tokens that differ, go to the row path
    mask[:, 3] = False
    assert uniform_selection(mask, num_kv_heads=2) is None
    mask[:, 3] = True
    mask[2, 1], mask[2, 0] = False, True
    assert uniform_selection(mask, num_kv_heads=2) is None


def test_plan_rows_slots_unique_and_in_range():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 8, generator=generator)
    mask = torch.zeros(10, 8, dtype=torch.bool).scatter_(-1, logits.topk(3, dim=-1).indices, True)

    plan = plan_rows(mask, num_kv_heads=2, top_k=3)

    # Head 0 and 1 and extras 4 and 5 share key/value head 0; 2, 3, 6, 7 share head 1
    per_group = torch.stack([mask[:, [0, 1, 4, 5]].sum(-1), mask[:, [2, 3, 6, 7]].sum(-1)], dim=-1)
    assert plan.slots_per_group == int(per_group.max())
    assert plan.counts == mask.sum(0).tolist()
    assert len(torch.unique(plan.slot)) == int(mask.sum())
    assert int(plan.slot.max()) < 10 * 2 * plan.slots_per_group
    assert torch.equal(mask[plan.token, plan.head], torch.ones_like(plan.token, dtype=torch.bool))
