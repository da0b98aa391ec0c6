"""``upcyclebase upcycle``: upcycle a model, verify it against the stock model, save and reload it."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkpoint import check_output_not_base, load_upcycled, save_upcycled
from ..config import GATE_MODES, KV_BANKS, ROUTER_INITS
from ..models import DEFAULT_MODEL_ID, load_base_model, resolve_device_dtype
from ..preflight import check_output_folder, read_model_shape
from ..upcycle import reset_router, set_moh, upcycle
from ..verify import Check, compare, encode_prompts, format_report, record
from .args import UsageError, add_dataclass_arguments, dataclass_from_args

logger = logging.getLogger(__name__)


@dataclass
class UpcycleArgs:
    model_id: str = field(default=DEFAULT_MODEL_ID, metadata={"help": "Base model: Hub id, local folder, or 'embedded' for the packaged Gemma-3 270M."})
    output_dir: str = field(default="./gemma3-1b-it-upcycled-heads", metadata={"help": "Folder to save the upcycled model to."})
    router_init: str = field(default="original", metadata={"help": "Heads the router selects at init.", "choices": ROUTER_INITS})
    gate_mode: str = field(default="hard", metadata={"help": "Gates of the selected heads.", "choices": GATE_MODES})
    kv_bank: str = field(default="shared", metadata={"help": "'separate' gives the extra heads their own K/V projections (2x KV cache of routed layers).", "choices": KV_BANKS})
    full_copy: bool = field(default=False, metadata={"help": "Save the base weights too, so the folder loads on its own."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output folder."})
    skip_verify: bool = field(default=False, metadata={"help": "Save without the verification report."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu (default: the best available)."})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: bf16 on CUDA, fp16 on MPS, fp32 on CPU)."})


def _verify(model, tokenizer, options: UpcycleArgs) -> list[Check]:
    device = next(model.parameters()).device
    prompts = encode_prompts(tokenizer, device)
    stock = record(model, prompts, desc="stock model")
    num_heads = model.config.get_text_config().num_attention_heads

    upcycle(model, router_init=options.router_init, gate_mode=options.gate_mode, kv_bank=options.kv_bank)
    checks = [compare("identity shortcut (bitwise)", stock, record(model, prompts, desc="identity shortcut"), None)]
    for router_init in ROUTER_INITS:
        reset_router(model, router_init)
        set_moh(model, identity_shortcut=False, top_k=num_heads)
        found = record(model, prompts, desc=f"routed, {router_init}")
        checks.append(compare(f"routed top_k={num_heads}, {router_init} init (bitwise)", stock, found, None))

    set_moh(model, top_k=max(1, num_heads // 2))
    sparse = compare(f"routed top_k={max(1, num_heads // 2)} (sparser)", stock, record(model, prompts, generate=False), None)
    sparse.passed = sparse.max_diff > 0
    sparse.note = "expected to differ"
    checks.append(sparse)

    reset_router(model, options.router_init)
    set_moh(model, identity_shortcut=True, top_k=num_heads)
    return checks


def _check_reload(model, tokenizer, options: UpcycleArgs) -> list[Check]:
    device = next(model.parameters()).device
    prompts = encode_prompts(tokenizer, device)
    reloaded = load_upcycled(options.output_dir, device=options.device, dtype=options.dtype)
    checks = []
    for shortcut in (True, False):
        for target in (model, reloaded):
            set_moh(target, identity_shortcut=shortcut)
        name = f"reload, {'identity shortcut' if shortcut else 'routed'} (bitwise)"
        checks.append(compare(name, record(model, prompts, generate=False), record(reloaded, prompts, generate=False), None))
    set_moh(model, identity_shortcut=True)
    return checks


def run(args: argparse.Namespace) -> int:
    options = dataclass_from_args(UpcycleArgs, args)
    output = Path(options.output_dir)
    if output.exists() and any(output.iterdir()) and not options.overwrite_output_dir:
        raise UsageError(f"--output_dir {options.output_dir!r} exists and is not empty; choose another folder or pass --overwrite_output_dir.")
    # Checks that read configs only, before the weights load
    resolve_device_dtype(options.device, options.dtype)
    read_model_shape(options.model_id)
    check_output_not_base(options.model_id, output)
    check_output_folder(options.output_dir)

    model, tokenizer = load_base_model(options.model_id, options.device, options.dtype)
    checks = [] if options.skip_verify else _verify(model, tokenizer, options)
    if options.skip_verify:
        upcycle(model, router_init=options.router_init, gate_mode=options.gate_mode, kv_bank=options.kv_bank)

    save_upcycled(model, output, tokenizer, full_copy=options.full_copy, base_model=options.model_id,
                  overwrite=options.overwrite_output_dir)
    if not options.skip_verify:
        checks += _check_reload(model, tokenizer, options)
        print(format_report(checks))
        report = {"settings": asdict(options), "checks": [asdict(check) for check in checks]}
        (output / "verification.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"Saved upcycled model to {output}")
    failed = [check.name for check in checks if not check.passed]
    if failed:
        logger.error("Verification failed: %s", ", ".join(failed))
        return 1
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(subparsers, "upcycle", "Upcycle a model, verify it against the stock model, save and reload it.", run)
    add_dataclass_arguments(parser, UpcycleArgs)
