"""UpcycleBase: add a routed second bank of attention heads to a pretrained Gemma-3 model."""

from .checkpoint import load_upcycled, save_upcycled
from .config import UpcycleConfig
from .upcycle import extra_parameters, freeze_base_weights, moh_modules, set_moh, upcycle

__all__ = [
    "UpcycleConfig",
    "extra_parameters",
    "freeze_base_weights",
    "load_upcycled",
    "moh_modules",
    "save_upcycled",
    "set_moh",
    "upcycle",
]
__version__ = "0.1.0"
