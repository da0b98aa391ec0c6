"""Upcycling the language model inside Gemma3ForConditionalGeneration."""

from __future__ import annotations

import torch
from conftest import tiny_gemma3_config

from upcyclebase import load_upcycled, moh_modules, save_upcycled, set_moh, upcycle


def _tiny_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=tiny_gemma3_config().to_dict(), vision_config=vision.to_dict(),
                          mm_tokens_per_image=4, image_token_index=127, boi_token_index=125, eoi_token_index=126)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(config).eval()


def test_language_model_blocks_upcycled():
    model = _tiny_multimodal()
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock = model(input_ids=ids).logits

    upcycle(model, router_init="interleaved")
    with torch.no_grad():
        identity = model(input_ids=ids).logits
    set_moh(model, identity_shortcut=False)
    with torch.no_grad():
        routed = model(input_ids=ids).logits

    # the text layers are upcycled; the vision tower's attention is another class and stays
    assert len(list(moh_modules(model))) == 2
    assert torch.equal(identity, stock)
    torch.testing.assert_close(routed, stock, rtol=0, atol=1e-5)


def test_multimodal_adapter_round_trip(tmp_path):
    model = _tiny_multimodal()
    upcycle(model, router_init="interleaved")
    set_moh(model, identity_shortcut=False, top_k=3)
    save_upcycled(model, tmp_path / "adapter", base_model="unused")
    ids = torch.randint(3, 120, (1, 12), generator=torch.Generator().manual_seed(0))

    reloaded = load_upcycled(tmp_path / "adapter", base_model=_tiny_multimodal())

    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
