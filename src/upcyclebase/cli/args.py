"""Command-line flags generated from dataclasses, so a flag and its field never disagree."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class UsageError(ValueError):
    """Bad command-line input: reported as one line with exit status 2."""


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean; use true or false")


def _base_type(annotation: Any) -> Any:
    """int for ``int | None``, and so on."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0]
    return annotation


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--field`` flag per dataclass field, with the field's default, type, choices and help."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = _base_type(hints[field.name])
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        options: dict[str, Any] = {"default": default, "help": field.metadata.get("help", "")}
        if "choices" in field.metadata:
            options["choices"] = field.metadata["choices"]
        if kind is bool:
            if default is False:
                options["action"] = "store_true"
            else:
                options.update(type=_parse_bool, metavar="{true,false}")
        else:
            options["type"] = kind
        if default is not None and kind is not bool:
            options["help"] += f" (default: {default})"
        parser.add_argument(f"--{field.name}", **options)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})
