"""``upcyclebase train``: fine-tune the extra heads and routers of an upcycled model on text.

A base model id or path is upcycled first; an upcycled folder (written by
``upcyclebase upcycle`` or by an earlier training run) continues training. Base
weights stay frozen. Runs on one device, or data-parallel under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..checkpoint import check_output_not_base, load_upcycled
from ..config import GATE_MODES, ROUTER_INITS
from ..data import CORPUS_ALIAS, load_blocks
from ..models import DEFAULT_MODEL_ID, load_base_model, resolve_device_dtype
from ..preflight import check_local_path, check_output_folder, check_seq_len, check_top_k, read_model_shape
from ..upcycle import freeze_base_weights, moh_modules, set_moh, upcycle
from .args import UsageError, add_dataclass_arguments, dataclass_from_args

logger = logging.getLogger(__name__)


@dataclass
class TrainArgs:
    model_id: str = field(default=DEFAULT_MODEL_ID, metadata={"help": "Base model to upcycle (Hub id, folder, or 'embedded'), or an upcycled folder to continue training."})
    output_dir: str = field(default="./gemma3-1b-it-upcycled-heads-trained", metadata={"help": "Folder for checkpoints, logs, plots and the trained model."})
    dataset: str = field(default=CORPUS_ALIAS, metadata={"help": "Hugging Face dataset name, a local .txt/.jsonl/.json/.parquet file or folder, or 'corpus' (real text prepared by `upcyclebase prepare-data`)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name, e.g. wikitext-2-raw-v1."})
    split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str = field(default="validation", metadata={"help": "Held-out split for perplexity; 'none' turns evaluation off."})
    text_field: str = field(default="text", metadata={"help": "Field or column that holds the text."})
    validation_percentage: float = field(default=5.0, metadata={"help": "Percent of train blocks held out when the dataset has no --eval_split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many held-out blocks."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per packed training block."})
    batch_size: int = field(default=2, metadata={"help": "Blocks per device per micro-batch."})
    grad_accum: int = field(default=8, metadata={"help": "Micro-batches accumulated per optimizer step."})
    lr: float = field(default=5e-5, metadata={"help": "Peak learning rate of AdamW."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers learning-rate schedule: linear, cosine, constant, constant_with_warmup, ..."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 turns clipping off."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps to train."})
    top_k: int | None = field(default=None, metadata={"help": "Heads selected per token out of 2H at the start (default: H, the stock model's output)."})
    top_k_final: int | None = field(default=None, metadata={"help": "top_k at the end of the schedule (default: --top_k, no schedule)."})
    top_k_decay_steps: int | None = field(default=None, metadata={"help": "Steps over which top_k falls linearly to --top_k_final (default: half of --max_steps)."})
    router_init: str = field(default="interleaved", metadata={"help": "Heads the router selects at upcycling; ignored when continuing an upcycled folder.", "choices": ROUTER_INITS})
    gate_mode: str = field(default="hard", metadata={"help": "Gates of the selected heads; ignored when continuing an upcycled folder.", "choices": GATE_MODES})
    router_bias: float = field(default=1.0, metadata={"help": "Router bias at upcycling: +bias for the selected heads, -bias for the others; larger keeps the initial selection longer. Ignored when continuing."})
    router_bias_anneal_steps: int = field(default=0, metadata={"help": "Steps over which the initial router bias is removed linearly (0: keep it)."})
    router_bias_final: float = field(default=0.0, metadata={"help": "Share of the initial router bias left after annealing."})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Weight of the load-balance loss (MoH uses 0.01); 0 turns it off."})
    identity_shortcut: bool = field(default=False, metadata={"help": "Run the untouched original attention: stock outputs, extras get no gradient (a baseline)."})
    logging_steps: int = field(default=10, metadata={"help": "Log loss, learning rate, tokens/s and routing statistics every this many steps."})
    eval_steps: int = field(default=200, metadata={"help": "Evaluate held-out perplexity every this many steps (also before the first and after the last)."})
    save_steps: int = field(default=500, metadata={"help": "Save a checkpoint every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint folder to resume from, or 'latest' for the newest complete one in --output_dir."})
    seed: int = field(default=42, metadata={"help": "Random seed."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in the backward pass to save memory."})
    report_to: str = field(default="none", metadata={"help": "Where to send logs besides the console: none, tensorboard, wandb, ... (comma-separated)."})
    full_copy: bool = field(default=False, metadata={"help": "Save the base weights with the trained model, so the folder loads on its own."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Train into a non-empty --output_dir that holds no checkpoint to resume."})
    sanity_once: bool = field(default=False, metadata={"help": "Run one batch, print the raw Hugging Face loss and exit."})
    mps_fp32: bool = field(default=False, metadata={"help": "On MPS, train in float32 without autocast."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu (default: the best available)."})
    dtype: str | None = field(default=None, metadata={"help": "Autocast dtype: float32 (none), bfloat16 or float16 (default: bf16 on CUDA, fp16 on MPS, fp32 on CPU)."})
    num_workers: int = field(default=0, metadata={"help": "Data-loader worker processes."})


def _check_options(options: TrainArgs) -> None:
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "logging_steps", "eval_steps", "save_steps"):
        value = getattr(options, name)
        if value < 1:
            raise UsageError(f"--{name} {value} is invalid; use a positive integer.")
    if options.lr <= 0:
        raise UsageError(f"--lr {options.lr} is invalid; use a positive number such as 5e-5.")
    if not 0 <= options.router_bias_final <= 1:
        raise UsageError(f"--router_bias_final {options.router_bias_final} is out of range; use a number from 0 to 1.")
    output = Path(options.output_dir)
    busy = output.is_dir() and any(output.iterdir())
    if busy and not (options.sanity_once or options.resume_from_checkpoint or options.overwrite_output_dir):
        raise UsageError(
            f"--output_dir {options.output_dir!r} exists and is not empty; pass --resume_from_checkpoint latest to continue, "
            "--overwrite_output_dir to train into it anyway, or another folder."
        )


def _check_model_and_data(options: TrainArgs) -> None:
    """Check flags that depend on the model's config and the dataset path, before loading either."""
    resolve_device_dtype(options.device, options.dtype)
    if options.dataset != CORPUS_ALIAS:
        check_local_path(options.dataset, "--dataset")
    shape = read_model_shape(options.model_id)
    check_output_not_base(options.model_id, options.output_dir)
    check_output_folder(options.output_dir)
    for flag, value in (("--top_k", options.top_k), ("--top_k_final", options.top_k_final)):
        if value is not None:
            check_top_k(value, shape.num_heads, flag)
    check_seq_len(options.seq_len, shape.max_positions)


def _precision(options: TrainArgs) -> tuple[str, torch.dtype | None]:
    """Return the device and the autocast dtype (None: plain float32). Trainable weights stay float32 for AdamW."""
    device, dtype = resolve_device_dtype(options.device, options.dtype)
    if torch.device(device).type == "mps" and options.mps_fp32:
        dtype = torch.float32
    return device, None if dtype == torch.float32 else dtype


def load_model(options: TrainArgs):
    """Load the model in float32 on the CPU (the Trainer places it), upcycled with the base frozen.

    Returns:
        (model, tokenizer, training state of a continued folder or {}).
    """
    from ..training import is_upcycled_folder, read_training_state

    if is_upcycled_folder(options.model_id):
        folder = Path(options.model_id).expanduser()
        model = load_upcycled(folder, device="cpu", dtype=torch.float32)
        from transformers import AutoTokenizer

        has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer else model.upcycle_base_model)
        state = read_training_state(folder)
        logger.info("Continuing training of the upcycled model in %s", folder)
    else:
        model, tokenizer = load_base_model(options.model_id, device="cpu", dtype=torch.float32)
        upcycle(model, router_init=options.router_init, gate_mode=options.gate_mode, router_bias=options.router_bias)
        state = {}

    num_heads = next(iter(moh_modules(model))).moh_num_heads // 2
    set_moh(model, enabled=True, identity_shortcut=options.identity_shortcut, top_k=num_heads if options.top_k is None else options.top_k)
    freeze_base_weights(model)
    model.config.use_cache = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, state


def load_data(options: TrainArgs, tokenizer, with_eval: bool = True):
    eval_split = None if options.eval_split.lower() == "none" or not with_eval else options.eval_split
    return load_blocks(
        tokenizer,
        options.dataset,
        options.dataset_config,
        split=options.split,
        eval_split=eval_split,
        text_field=options.text_field,
        seq_len=options.seq_len,
        validation_percentage=options.validation_percentage,
        max_eval_samples=options.max_eval_samples,
    )


@torch.no_grad()
def sanity_loss(model, batch: torch.Tensor, device: str, autocast_dtype: torch.dtype | None) -> float:
    """Compute the raw Hugging Face loss of ``model`` on one batch of blocks (labels = input ids)."""
    model.to(device).eval()
    batch = batch.to(device)
    with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        return model(input_ids=batch, labels=batch).loss.float().item()


def _run_sanity_once(options: TrainArgs) -> int:
    device, autocast_dtype = _precision(options)
    model, tokenizer, _ = load_model(options)
    splits = load_data(options, tokenizer, with_eval=False)
    batch = splits.train.blocks[: options.batch_size]
    path = "identity shortcut" if options.identity_shortcut else f"routed, top_k={next(iter(moh_modules(model))).moh_top_k}"
    loss = sanity_loss(model, batch, device, autocast_dtype)
    print(f"sanity_once: {tuple(batch.shape)} batch, {path}: loss {loss!r}")
    if not math.isfinite(loss):
        logger.error("The loss is not finite; check the model weights and the data.")
        return 1
    return 0


def build_trainer(options: TrainArgs, model, tokenizer, splits, state: dict):
    """Build the MoHTrainer with the top_k schedule and router-bias annealing callbacks."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from ..training import MoHTrainer, RouterBiasAnnealCallback, RoutingProgressCallback, TopKScheduleCallback

    device, autocast_dtype = _precision(options)
    device_type = torch.device(device).type
    has_eval = splits.validation is not None and len(splits.validation) > 0
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = TrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr,
        lr_scheduler_type=options.lr_scheduler_type,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        max_steps=options.max_steps,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=options.eval_steps,
        eval_on_start=has_eval,
        prediction_loss_only=True,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        activation_checkpointing=options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if options.gradient_checkpointing else None,
        report_to=[name.strip() for name in options.report_to.split(",")] if options.report_to != "none" else "none",
        use_cpu=device_type == "cpu",
        bf16=autocast_dtype == torch.bfloat16,
        fp16=autocast_dtype == torch.float16,
        ddp_backend="gloo" if device_type == "cpu" and world_size > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=options.num_workers,
        restore_callback_states_from_checkpoint=False,
    )

    first_block = next(iter(moh_modules(model)))
    top_k = first_block.moh_num_heads // 2 if options.top_k is None else options.top_k
    top_k_final = top_k if options.top_k_final is None else options.top_k_final
    first_block.check_top_k(top_k_final)  # fail now, not when the schedule reaches it
    decay_steps = options.top_k_decay_steps if options.top_k_decay_steps is not None else options.max_steps // 2
    if decay_steps < 0:
        raise UsageError(f"--top_k_decay_steps {decay_steps} is invalid; use 0 or a positive integer.")
    callbacks = [TopKScheduleCallback(top_k, top_k_final, decay_steps)]
    if options.router_bias_anneal_steps > 0:
        start_scale = float(state.get("router_bias_scale", 1.0))
        callbacks.append(RouterBiasAnnealCallback(model, options.router_bias_anneal_steps, options.router_bias_final, start_scale))

    trainer = MoHTrainer(
        model=model,
        args=args,
        train_dataset=splits.train,
        eval_dataset=splits.validation if has_eval else None,
        callbacks=callbacks,
        aux_loss_coef=options.aux_loss_coef,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(RoutingProgressCallback())
    return trainer


def _final_perplexities(trainer) -> tuple[float | None, float | None]:
    evals = [entry["eval_perplexity"] for entry in trainer.state.log_history if "eval_perplexity" in entry]
    return (evals[0], evals[-1]) if evals else (None, None)


def run(args: argparse.Namespace) -> int:
    from ..plots import plot_head_usage, plot_loss_curves
    from ..training import (
        NonFiniteLossError,
        base_weight_digests,
        bias_scale,
        count_parameters,
        resolve_checkpoint,
        save_final_model,
    )

    options = dataclass_from_args(TrainArgs, args)
    _check_options(options)
    _check_model_and_data(options)
    if options.sanity_once:
        return _run_sanity_once(options)

    started = time.perf_counter()
    checkpoint = resolve_checkpoint(options.resume_from_checkpoint, options.output_dir)
    model, tokenizer, state = load_model(options)
    trainable, total = count_parameters(model)
    print(f"Parameters: {trainable:,} trainable (extra banks and routers) of {total:,} total ({100 * trainable / total:.2f}%)")

    splits = load_data(options, tokenizer)
    held_out = f"{len(splits.validation)} blocks from {splits.validation_source}" if splits.validation is not None else "none"
    print(f"Data: {len(splits.train)} train blocks of {options.seq_len} tokens; held-out: {held_out}")

    trainer = build_trainer(options, model, tokenizer, splits, state)
    if trainer.args.world_size > 1 and trainer.is_world_process_zero():
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        print(f"Data-parallel: {trainer.args.world_size} processes, backend {backend}")
    before = base_weight_digests(model)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except NonFiniteLossError as error:
        print(f"upcyclebase train: error: {error}", file=sys.stderr)
        return 1
    if splits.validation is not None and options.max_steps % options.eval_steps != 0:
        trainer.evaluate()
    base_unchanged = base_weight_digests(model) == before
    if not base_unchanged:
        raise RuntimeError("A base weight changed during training; only the extra banks and routers may change.")
    if not trainer.is_world_process_zero():
        return 0

    output = Path(options.output_dir)
    ppl_start, ppl_end = _final_perplexities(trainer)
    scale = bias_scale(options.max_steps, float(state.get("router_bias_scale", 1.0)), options.router_bias_final,
                       options.router_bias_anneal_steps)
    summary = {
        "model_id": options.model_id,
        "steps": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "eval_perplexity_start": ppl_start,
        "eval_perplexity_end": ppl_end,
        "held_out": held_out,
        "base_weights_unchanged": base_unchanged,
        "router_bias_scale": scale,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "settings": asdict(options),
    }
    base_model = getattr(model, "upcycle_base_model", None) or options.model_id
    save_final_model(model, tokenizer, output, full_copy=options.full_copy, base_model=base_model, training_state=summary)
    (output / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")

    plot_loss_curves(trainer.state.log_history, output / "loss_curves.png")
    usage, title = getattr(trainer, "last_eval_head_usage", None), "Head usage (share of held-out tokens)"
    if usage is None:
        usage, title = trainer.run_stats.head_usage(), "Head usage (share of training tokens)"
    if usage is not None:
        plot_head_usage(usage, output / "head_usage.png", title=title)

    if ppl_start is not None:
        print(f"Held-out perplexity ({held_out}): {ppl_start:.3f} at the start, {ppl_end:.3f} at the end")
    print(f"Base weights bitwise unchanged: {'yes' if base_unchanged else 'NO'}")
    print(f"Saved the trained model, plots (loss_curves.png, head_usage.png) and logs to {output}")
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(subparsers, "train", "Fine-tune the extra heads and routers of an upcycled model on text.", run)
    add_dataclass_arguments(parser, TrainArgs)
