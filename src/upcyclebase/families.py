"""Attention classes that can be upcycled, by transformers model family."""

from __future__ import annotations

from importlib import import_module

from torch import nn

# model family -> (transformers module, attention class name)
SUPPORTED_ATTENTION = {
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3Attention"),
}


def supported_attention_classes() -> tuple[type, ...]:
    classes = []
    for module_name, class_name in SUPPORTED_ATTENTION.values():
        classes.append(getattr(import_module(module_name), class_name))
    return tuple(classes)


def find_attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every attention block of a supported family in ``model``, with its qualified name."""
    classes = supported_attention_classes()
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, classes)]
    if not found:
        supported = ", ".join(f"{family} ({cls})" for family, (_, cls) in SUPPORTED_ATTENTION.items())
        raise ValueError(
            f"{type(model).__name__} has no attention block that can be upcycled; supported families: {supported}."
        )
    return found
