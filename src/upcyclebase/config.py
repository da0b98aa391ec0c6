"""Settings of an upcycled model, kept apart from the transformers model config.

The model config keeps its head counts: the extra bank and the router are described
here and saved next to the weights as ``upcycle_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROUTER_INITS = ("original", "interleaved")
GATE_MODES = ("hard", "renorm")
KV_BANKS = ("shared", "separate")
CONFIG_NAME = "upcycle_config.json"
ADAPTER_NAME = "upcycle_adapter.safetensors"
FORMAT_VERSION = 1


@dataclass
class UpcycleConfig:
    """Construction of the extra heads and the router, and the current routing state."""

    router_init: str = field(
        default="original",
        metadata={"help": "Heads selected at init: 'original' (heads 0..H-1) or 'interleaved' (alternately original or copy)."},
    )
    router_bias: float = field(
        default=1.0,
        metadata={"help": "Router bias magnitude at init: selected heads get +bias, the others -bias."},
    )
    gate_mode: str = field(
        default="hard",
        metadata={"help": "'hard': selected gates are 1.0 with a straight-through gradient; 'renorm': top_k x softmax over the selected heads."},
    )
    kv_bank: str = field(
        default="shared",
        metadata={"help": "'shared': extra heads read the original key/value heads; 'separate': they get their own k_proj_extra and v_proj_extra (copies at init), which doubles the KV cache of upcycled layers."},
    )
    enabled: bool = field(default=True, metadata={"help": "Routing on; off runs the original attention."})
    identity_shortcut: bool = field(
        default=True,
        metadata={"help": "Run the untouched original attention (bitwise the stock model)."},
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Heads selected per token out of 2H; None means H."},
    )

    def __post_init__(self) -> None:
        if self.router_init not in ROUTER_INITS:
            raise ValueError(f"router_init={self.router_init!r} is invalid; use one of {ROUTER_INITS}.")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode={self.gate_mode!r} is invalid; use one of {GATE_MODES}.")
        if self.kv_bank not in KV_BANKS:
            raise ValueError(f"kv_bank={self.kv_bank!r} is invalid; use one of {KV_BANKS}.")
        if not isinstance(self.router_bias, (int, float)) or not self.router_bias > 0:
            raise ValueError(f"router_bias={self.router_bias!r} is invalid; use a positive number such as 1.0.")
        for name in ("enabled", "identity_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; use true or false.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"top_k={self.top_k!r} is invalid; use an integer or null.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> UpcycleConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown upcycle settings {unknown}; valid keys are {sorted(known)}.")
        return cls(**values)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
