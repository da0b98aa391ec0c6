"""``upcyclebase bench``: time and size the upcycled model against the stock model and LoRA."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shlex
import time
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ..benchmark import CLOCKS, BenchSettings, run_benchmark
from ..benchmark_report import describe_machine, summary_lines, write_outputs
from ..embedded import EMBEDDED_MODEL_ID
from ..models import resolve_device_dtype, resolve_model_path
from .args import UsageError, add_dataclass_arguments, dataclass_from_args

logger = logging.getLogger(__name__)

# A smoke run: every measurement once or twice on short inputs
QUICK_SETTINGS = dict(
    batch_sizes=(1,), seq_lens=(32, 64), repeats=2, long_repeats=1, gen_prompt_len=16, gen_new_tokens=4,
    gen_repeats=1, train_seq=64, train_repeats=1, profile_seq=64,
)


@dataclass
class BenchArgs:
    model_id: str = field(default="embedded", metadata={"help": f"Model: Hub id, local folder, or 'embedded' ({EMBEDDED_MODEL_ID})."})
    output_dir: str = field(default="benchmarks", metadata={"help": "Folder for BENCHMARKS.md, benchmark.json and benchmark.png."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda where present)."})
    dtype: str | None = field(default="float32", metadata={"help": "float32, bfloat16 or float16; the targets are stated for float32."})
    quick: bool = field(default=False, metadata={"help": "Smoke run: batch 1, lengths 32 and 64, one or two repeats; overrides the size and repeat flags."})
    batch_sizes: str = field(default="1,4", metadata={"help": "Comma-separated batch sizes of the forward measurement."})
    seq_lens: str = field(default="128,512,2048", metadata={"help": "Comma-separated sequence lengths of the forward measurement."})
    repeats: int = field(default=5, metadata={"help": "Rounds per forward cell."})
    long_repeats: int = field(default=2, metadata={"help": "Rounds per forward cell of 2048 tokens or more (batch x length)."})
    gen_prompt_len: int = field(default=128, metadata={"help": "Prompt length of the generation measurement, in tokens."})
    gen_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per generation round."})
    gen_repeats: int = field(default=3, metadata={"help": "Rounds of the generation measurement."})
    train_seq: int = field(default=512, metadata={"help": "Sequence length of the training step (batch 1)."})
    train_repeats: int = field(default=2, metadata={"help": "Timed rounds of the training step."})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: torch's choice)."})
    clock: str = field(default="wall", metadata={"help": "Clock the targets are judged on: 'wall' (elapsed) or 'cpu' (process CPU time, steadier on a shared CPU; CPU devices only).", "choices": CLOCKS})
    seed: int = field(default=0, metadata={"help": "Seed of the inputs and the random router weights."})


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"--{flag} {text!r} is invalid; use comma-separated positive integers such as 1,4.")
    return values


def settings_from(options: BenchArgs) -> BenchSettings:
    """Build the measurement settings from the flags, or the smoke run's under --quick."""
    for name in ("repeats", "long_repeats", "gen_prompt_len", "gen_new_tokens", "gen_repeats", "train_seq", "train_repeats"):
        if getattr(options, name) < 1:
            raise UsageError(f"--{name} {getattr(options, name)} is invalid; use a positive integer.")
    if options.quick:
        return BenchSettings(seed=options.seed, clock=options.clock, **QUICK_SETTINGS)
    seq_lens = _int_list(options.seq_lens, "seq_lens")
    return BenchSettings(
        batch_sizes=_int_list(options.batch_sizes, "batch_sizes"), seq_lens=seq_lens, repeats=options.repeats,
        long_repeats=options.long_repeats, gen_prompt_len=options.gen_prompt_len, gen_new_tokens=options.gen_new_tokens,
        gen_repeats=options.gen_repeats, train_seq=options.train_seq, train_repeats=options.train_repeats,
        profile_seq=512 if 512 in seq_lens else min(seq_lens), seed=options.seed, clock=options.clock,
    )


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "upcyclebase"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def command_line(options: BenchArgs) -> str:
    """Return the ``upcyclebase bench`` command that repeats this run, with the flags that differ from their defaults."""
    words = ["upcyclebase", "bench"]
    for item in fields(BenchArgs):
        value = getattr(options, item.name)
        if value == item.default:
            continue
        words += [f"--{item.name}"] if value is True else [f"--{item.name}", str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    options = dataclass_from_args(BenchArgs, args)
    settings = settings_from(options)
    if options.threads is not None:
        if options.threads < 1:
            raise UsageError(f"--threads {options.threads} is invalid; use a positive integer.")
        torch.set_num_threads(options.threads)
    device, dtype = resolve_device_dtype(options.device, options.dtype)
    if options.clock == "cpu" and torch.device(device).type != "cpu":
        raise UsageError(f"--clock cpu measures work on the CPU, not on {device}; use --clock wall.")
    model_path = resolve_model_path(options.model_id)

    start, load_start = time.perf_counter(), os.getloadavg()
    results = run_benchmark(model_path, device, dtype, settings)
    environment = {
        "command": command_line(options),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": describe_machine(),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "wall_seconds": time.perf_counter() - start,
    }
    paths = write_outputs(results, environment, {**asdict(options), **asdict(settings)}, Path(options.output_dir))
    for line in summary_lines(results):
        print(line)
    print(f"Wrote {paths['page']}, {paths['json']} and {paths['plot']}")
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(subparsers, "bench", "Time the upcycled model against the stock model and PEFT LoRA; write a record page, JSON and plot.", run)
    add_dataclass_arguments(parser, BenchArgs)
