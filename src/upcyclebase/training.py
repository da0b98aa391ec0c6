"""Training the extra heads and routers of an upcycled model with transformers' Trainer.

:class:`MoHTrainer` adds MoH's load-balance loss to the language-model loss, collects
routing statistics, stops on a NaN or infinite loss, and writes checkpoints that hold
only the trainable weights (the extra banks and routers) next to the optimizer state.
Callbacks lower top_k on a schedule and anneal the routers' initial bias toward 0.

Shape legend: L: upcycled layers, E: heads in both banks (2H).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .checkpoint import save_upcycled
from .config import ADAPTER_NAME, CONFIG_NAME
from .router import Routing, init_router_bias, load_balance_loss
from .upcycle import extra_parameters, moh_modules, set_moh

logger = logging.getLogger(__name__)

TRAINING_STATE_NAME = "training_state.json"
TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """The training loss or the trainable weights became NaN or infinite."""


# ---- Routing statistics -----------------------------------------------------------------------


class RoutingStats:
    """Head usage and router entropy per layer, summed over the tokens seen since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.usage_sum: torch.Tensor | None = None  # (L, E) selections per head
        self.entropy_sum: torch.Tensor | None = None  # (L,)
        self.tokens = 0

    @torch.no_grad()
    def update(self, routings: list[Routing]) -> None:
        if not routings:
            return
        # (L, E): how many tokens selected each head; (L,): summed entropy of the routing softmax
        usage = torch.stack([r.mask.reshape(-1, r.mask.shape[-1]).sum(0) for r in routings]).double().cpu()
        probs = [r.probs.reshape(-1, r.probs.shape[-1]) for r in routings]
        entropy = torch.stack([-(p * p.clamp_min(1e-12).log()).sum(-1).sum() for p in probs]).double().cpu()
        if self.usage_sum is None:
            self.usage_sum, self.entropy_sum = usage, entropy
        else:
            self.usage_sum += usage
            self.entropy_sum += entropy
        self.tokens += probs[0].shape[0]

    def head_usage(self) -> np.ndarray | None:
        """(L, E) share of tokens that selected each head."""
        if self.usage_sum is None or self.tokens == 0:
            return None
        return (self.usage_sum / self.tokens).numpy()

    def summary(self, prefix: str = "routing/") -> dict[str, float]:
        """Mean active heads per token, and per layer the share of selections that went to extra heads and the router entropy (nats)."""
        usage = self.head_usage()
        if usage is None:
            return {}
        num_heads = usage.shape[1] // 2
        extra_share = usage[:, num_heads:].sum(1) / usage.sum(1)
        entropy = (self.entropy_sum / self.tokens).numpy()
        logs = {
            f"{prefix}active_heads": float(usage.sum(1).mean()),
            f"{prefix}extra_share": float(extra_share.mean()),
            f"{prefix}entropy": float(entropy.mean()),
        }
        for layer, (share, layer_entropy) in enumerate(zip(extra_share, entropy)):
            logs[f"{prefix}extra_share/layer_{layer:02d}"] = float(share)
            logs[f"{prefix}entropy/layer_{layer:02d}"] = float(layer_entropy)
        return logs


# ---- Trainer ----------------------------------------------------------------------------------


def _peak_memory_gb() -> float:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is in kilobytes on Linux and bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class MoHTrainer(Trainer):
    """A Trainer for upcycled models: auxiliary loss, routing statistics, NaN stop, adapter checkpoints.

    Args:
        aux_loss_coef: weight of the load-balance loss (mean over layers) added to the LM loss;
            MoH uses 0.01. Evaluation reports the LM loss alone.
        tokenizer_to_save: saved with the final model; checkpoints hold weights only.
        Other arguments go to :class:`transformers.Trainer`.
    """

    def __init__(self, *args: Any, aux_loss_coef: float = 0.01, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef={aux_loss_coef!r} is invalid; use 0 or a positive number such as 0.01.")
        self.aux_loss_coef = aux_loss_coef
        # The model then returns the mean loss of each micro-batch and the Trainer divides it by
        # the accumulation steps, so the auxiliary loss can be added on the same scale.
        self.model_accepts_loss_kwargs = False
        self.train_stats = RoutingStats()  # since the last log
        self.run_stats = RoutingStats()  # the whole run, for the head-usage map without evaluation
        self.eval_stats = RoutingStats()
        self._moh_modules = list(moh_modules(self.model))
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._lm_loss_sum = 0.0
        self._aux_loss_sum = 0.0
        self._micro_batches = 0
        self._tokens = 0
        self._compute_seconds = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for module in self._moh_modules:
            module.moh_record_routing = True
            module.moh_last_routing = None
        outputs = model(**inputs)
        routings = [module.moh_last_routing for module in self._moh_modules if module.moh_last_routing is not None]
        for module in self._moh_modules:
            module.moh_last_routing = None

        loss = outputs.loss
        if not model.training:
            self.eval_stats.update(routings)
            return (loss, outputs) if return_outputs else loss

        self.train_stats.update(routings)
        self.run_stats.update(routings)
        if not loss.requires_grad:
            # The identity shortcut bypasses every trainable weight: connect them with a zero
            # factor, so backward runs, they get zero gradients and DDP counts them as used.
            loss = loss + 0.0 * sum(param.sum() for param in model.parameters() if param.requires_grad)
        self._lm_loss_sum += loss.detach().float().item()
        self._micro_batches += 1
        if routings:
            aux_loss = torch.stack([load_balance_loss(r.probs, r.mask) for r in routings]).mean()
            self._aux_loss_sum += aux_loss.detach().item()
            if self.aux_loss_coef > 0:
                loss = loss + self.aux_loss_coef * aux_loss.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._compute_seconds += time.perf_counter() - started
        self._tokens += inputs["input_ids"].numel() * self.accelerator.num_processes
        self._stop_if_not_finite(loss)
        return loss

    def _stop_if_not_finite(self, loss: torch.Tensor) -> None:
        """Raise before the optimizer step, so the weights and checkpoints stay as they were after the last finite step."""
        bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
        if self.accelerator.num_processes > 1:
            # Every process stops together; one raising alone would leave the others waiting.
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            step = self.state.global_step + 1
            raise NonFiniteLossError(
                f"The training loss is {loss.item()} at step {step}; training stopped. "
                f"{_last_good_checkpoint_note(self.args.output_dir)} "
                "Lower --lr or check the data before resuming."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._micro_batches:
            logs["lm_loss"] = self._lm_loss_sum / self._micro_batches
            logs["aux_loss"] = self._aux_loss_sum / self._micro_batches
            logs["tokens_per_second"] = self._tokens / max(self._compute_seconds, 1e-9)
            logs["peak_memory_gb"] = _peak_memory_gb()
            if self._moh_modules:
                logs["routing/top_k"] = float(self._moh_modules[0].moh_top_k)
            logs.update(self.train_stats.summary("routing/"))
            self.train_stats.reset()
            self._reset_interval()
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 700.0))
            summary = self.eval_stats.summary("eval_routing/")
            logs.update({key: value for key, value in summary.items() if "/layer_" not in key})
            self.last_eval_head_usage = self.eval_stats.head_usage()
            self.eval_stats.reset()
        super().log(logs, start_time)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self.eval_stats.reset()
        return super().evaluate(*args, **kwargs)

    # Checkpoints hold the extra banks and routers only: the base weights never change.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        # Checked on every process (the weights are the same on all), so all of them stop together
        bad = [name for name, param in extra_parameters(model).items() if not torch.isfinite(param).all()]
        if bad:
            raise NonFiniteLossError(
                f"Trainable weight {bad[0]} contains NaN or infinite values at step {self.state.global_step}; "
                f"training stopped without saving. {_last_good_checkpoint_note(self.args.output_dir)}"
            )
        if not self.args.should_save:
            return
        save_upcycled(model, output_dir, overwrite=True)
        torch.save(self.args, Path(output_dir) / "training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_adapter_weights(model, Path(resume_from_checkpoint))


def load_adapter_weights(model: nn.Module, folder: Path) -> None:
    """Copy the extra banks and routers saved in ``folder`` into an upcycled ``model``."""
    path = folder / ADAPTER_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {folder} is not a checkpoint written by upcyclebase train.")
    tensors = load_file(path)
    params = extra_parameters(model)
    if set(tensors) != set(params):
        missing = sorted(set(params) - set(tensors))[:3]
        raise ValueError(f"{path} does not match this model (missing {missing}); resume with the model it was trained from.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


# ---- Checkpoint folders -----------------------------------------------------------------------


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint folders whose trainer state was written (it is written last), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = _CHECKPOINT_PATTERN.match(child.name)
        if match and (child / TRAINER_STATE_NAME).is_file() and (child / ADAPTER_NAME).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def _last_good_checkpoint_note(output_dir: str | Path) -> str:
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        return "No checkpoint was saved yet."
    return f"The last good checkpoint is {checkpoints[-1]}; resume with --resume_from_checkpoint {checkpoints[-1]}."


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | Path) -> str | None:
    """Map ``latest`` to the newest complete checkpoint in ``output_dir`` and check a given folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(f"No complete checkpoint in {str(output_dir)!r} to resume from; start without --resume_from_checkpoint.")
        return str(checkpoints[-1])
    folder = Path(resume_from_checkpoint)
    if not (folder / TRAINER_STATE_NAME).is_file() or not (folder / ADAPTER_NAME).is_file():
        raise FileNotFoundError(
            f"{resume_from_checkpoint!r} is not a complete checkpoint (it needs {TRAINER_STATE_NAME} and {ADAPTER_NAME}); "
            "pass another checkpoint folder or 'latest'."
        )
    return str(folder)


# ---- Schedules --------------------------------------------------------------------------------


def scheduled_top_k(step: int, start: int, final: int, decay_steps: int) -> int:
    """top_k for the optimizer step after ``step`` completed steps: linear from ``start`` to ``final`` over ``decay_steps``, rounded."""
    if decay_steps <= 0 or step >= decay_steps:
        return final
    return round(start + (final - start) * step / decay_steps)


class TopKScheduleCallback(TrainerCallback):
    """Set top_k on every upcycled block before each optimizer step, from the step count alone (so resuming agrees)."""

    def __init__(self, start: int, final: int, decay_steps: int) -> None:
        self.start, self.final, self.decay_steps = start, final, decay_steps

    def _apply(self, state, model) -> None:
        top_k = scheduled_top_k(state.global_step, self.start, self.final, self.decay_steps)
        if model is not None and next(iter(moh_modules(model))).moh_top_k != top_k:
            set_moh(model, top_k=top_k)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._apply(state, model)


def initial_router_bias(model: nn.Module) -> dict[nn.Module, torch.Tensor]:
    """Recompute the bias each router got at upcycling (from the model's upcycle config), per upcycled block."""
    config = model.upcycle_config
    biases = {}
    for module in moh_modules(model):
        router = nn.Linear(module.moh_router.in_features, module.moh_router.out_features, bias=True)
        init_router_bias(router, module.moh_num_heads // 2, config.router_init, config.router_bias, module.layer_idx)
        biases[module] = router.bias.detach().to(module.moh_router.bias)
    return biases


def bias_scale(step: int, start: float, final: float, anneal_steps: int) -> float:
    """Return the share of the initial router bias left after ``step`` steps: linear from ``start`` to ``final``."""
    if anneal_steps <= 0:
        return start
    return start + (final - start) * min(step, anneal_steps) / anneal_steps


class RouterBiasAnnealCallback(TrainerCallback):
    """Remove the initial router bias step by step, so the learned router weights take over the selection.

    After step s the router bias is (learned part) + scale(s) x (initial bias); each step
    subtracts (scale(s-1) - scale(s)) x (initial bias). The update depends on the step
    count only, so a resumed run applies exactly the same updates.
    """

    def __init__(self, model: nn.Module, anneal_steps: int, final_scale: float = 0.0, start_scale: float = 1.0) -> None:
        self.initial = initial_router_bias(model)
        self.anneal_steps, self.final_scale, self.start_scale = anneal_steps, final_scale, start_scale

    def scale(self, step: int) -> float:
        return bias_scale(step, self.start_scale, self.final_scale, self.anneal_steps)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        delta = self.scale(step - 1) - self.scale(step)
        if delta != 0:
            with torch.no_grad():
                for module, bias in self.initial.items():
                    module.moh_router.bias.sub_(bias.to(module.moh_router.bias.device) * delta)


class RoutingProgressCallback(ProgressCallback):
    """The progress bar, with one short line per log in place of the full metrics dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "eval_loss" in logs and self.prediction_bar is not None:
            # Evaluation logs before its bar is closed; close it first so the line prints cleanly
            self.prediction_bar.close()
            self.prediction_bar = None
        line = format_log_line(state.global_step, logs)
        if line:
            (self.training_bar.write if self.training_bar is not None else print)(line)


def format_log_line(step: int, logs: dict[str, float]) -> str:
    if "eval_loss" in logs:
        return f"step {step:>5}  eval_loss {logs['eval_loss']:.4f}  eval_perplexity {logs['eval_perplexity']:.3f}"
    if "loss" not in logs:
        return ""
    parts = [f"step {step:>5}", f"loss {logs['loss']:.4f}"]
    for key, label, spec in (
        ("lm_loss", "lm", ".4f"),
        ("aux_loss", "aux", ".4f"),
        ("learning_rate", "lr", ".2e"),
        ("tokens_per_second", "tok/s", ".0f"),
        ("routing/active_heads", "active_heads", ".2f"),
        ("routing/extra_share", "extra_share", ".3f"),
        ("routing/entropy", "entropy", ".3f"),
        ("peak_memory_gb", "mem_gb", ".1f"),
    ):
        if key in logs:
            parts.append(f"{label} {logs[key]:{spec}}")
    return "  ".join(parts)


# ---- Base weights and the final save ----------------------------------------------------------


def base_weight_digests(model: nn.Module) -> dict[str, str]:
    """Hash (sha256) the bytes of every parameter that upcycling did not add, by name."""
    extras = {id(param) for param in extra_parameters(model).values()}
    digests = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in extras:
            continue
        data = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digests[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return digests


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    params = list(model.parameters())  # parameters() yields a tied tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_final_model(
    model: nn.Module, tokenizer: Any, output_dir: str | Path, *, full_copy: bool, base_model: str, training_state: dict
) -> Path:
    """Write the upcycled model into ``output_dir`` next to its checkpoints, logs and plots.

    ``save_upcycled`` replaces whole folders, so the model is saved in a staging folder
    and its files are moved in one by one.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".final-") as staging:
        saved = save_upcycled(model, Path(staging) / "model", tokenizer, full_copy=full_copy, base_model=base_model)
        for item in saved.iterdir():
            target = output_dir / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    (output_dir / TRAINING_STATE_NAME).write_text(json.dumps(training_state, indent=2, sort_keys=True) + "\n")
    return output_dir


def read_training_state(folder: str | Path) -> dict:
    path = Path(folder) / TRAINING_STATE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def is_upcycled_folder(path: str | Path) -> bool:
    return (Path(path).expanduser() / CONFIG_NAME).is_file()
