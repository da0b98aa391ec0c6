"""Speed and memory of an upcycled model against the stock model and PEFT LoRA, in one run.

Variants of the same base model (see ``VARIANTS``) are measured on the same machine,
interleaved: every round runs each variant once, in an order that rotates from round to
round, so a slow spell of a shared machine falls on all variants alike. Each figure is
the median of the rounds, with min and max as its spread.

Measurements:
    forward     one prefill forward (logits of the last position only), per batch size and length
    generate    greedy generation with the KV cache, new tokens per second
    train       one step (forward, cross-entropy backward, AdamW) and its peak memory
    profile     one forward with the logits of every position, time split by operator class

Peak memory of a training step is the bytes of the variant's tensors alive when the step
starts (all weights, optimizer states) plus the largest growth during the step. On CUDA
the growth comes from ``torch.cuda.max_memory_allocated``. On CPU it is the growth of the
process's peak resident set size (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``),
with glibc told to map every allocation of 64 KiB or more on its own, so that freed
tensors return to the system instead of hiding in the heap.

NOTE: the CUDA branches (synchronised timing, allocator peak, device time in the profile)
have not been run on a GPU.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .upcycle import extra_parameters, freeze_base_weights, moh_modules, set_moh, upcycle

logger = logging.getLogger(__name__)

# variant key -> label on the record page
VARIANTS = {
    "stock": "stock",
    "identity": "upcycled, identity shortcut",
    "routed": "routed top_k=H",
    "routed_half": "routed top_k=H/2",
    "routed_dense": "routed top_k=H, dense reference",
    "lora": "LoRA q,k,v,o (equal trainable parameters)",
}
FORWARD_VARIANTS = ("stock", "identity", "routed", "routed_half", "routed_dense", "lora")
# Forward cells of long_tokens or more (batch x length) skip the identity shortcut and the dense
# reference, so that a full run on two CPU cores stays within about 15 minutes
LONG_FORWARD_VARIANTS = ("stock", "routed", "routed_half", "lora")
GENERATE_VARIANTS = ("stock", "routed", "routed_half", "lora")
TRAIN_VARIANTS = ("routed", "lora")
PROFILE_VARIANTS = ("stock", "routed", "routed_half", "routed_dense", "lora")
DECODE_PROFILE_STEPS = 4
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# wall: elapsed time; cpu: CPU time of the whole process, which on a shared machine leaves out
# the time other processes hold the cores
CLOCKS = ("wall", "cpu")


@dataclass
class BenchSettings:
    """Input sizes and repeat counts of a benchmark run."""

    batch_sizes: tuple[int, ...] = (1, 4)
    seq_lens: tuple[int, ...] = (128, 512, 2048)
    repeats: int = 5
    long_repeats: int = 2
    long_tokens: int = 2048
    gen_prompt_len: int = 128
    gen_new_tokens: int = 32
    gen_repeats: int = 3
    train_batch: int = 1
    train_seq: int = 512
    train_repeats: int = 2
    profile_seq: int = 512
    seed: int = 0
    clock: str = "wall"  # the clock the targets are judged on, one of CLOCKS


@dataclass
class Samples:
    """Repeated measurements of one variant in one cell, in seconds (or bytes, or tokens/s)."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def summary(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "values": self.values}


class Synchronizer:
    """Waits for queued device work, so wall-clock timings cover it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def time_call(function: Callable[[], Any], sync: Synchronizer) -> dict[str, float]:
    """Run ``function`` once; return its wall-clock seconds and the process's CPU seconds (all threads)."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    sync()
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


class BenchModels:
    """The three model copies the variants run on, and how each variant is switched on.

    ``stock`` is an untouched copy. ``identity``, ``routed``, ``routed_half`` and
    ``routed_dense`` share one upcycled copy whose router weights are random (see
    :func:`randomize_routers`), so tokens spread over the heads as after training.
    ``lora`` is a PEFT LoRA copy on q, k, v and o whose rank gives as many trainable
    parameters as the upcycled copy's extra banks and routers.
    """

    def __init__(self, stock: nn.Module, upcycled: nn.Module, lora: nn.Module, lora_rank: int) -> None:
        self.stock = stock
        self.upcycled = upcycled
        self.lora = lora
        self.lora_rank = lora_rank
        self.num_heads = upcycled.config.num_attention_heads

    def activate(self, variant: str) -> nn.Module:
        """Set the upcycled copy's routing for ``variant`` and return the model that runs it."""
        if variant == "stock":
            return self.stock
        if variant == "lora":
            return self.lora
        routed_settings = {
            "identity": (True, self.num_heads, False),
            "routed": (False, self.num_heads, False),
            "routed_half": (False, max(1, self.num_heads // 2), False),
            "routed_dense": (False, self.num_heads, True),
        }
        if variant not in routed_settings:
            raise ValueError(f"Unknown variant {variant!r}; valid variants are {sorted(VARIANTS)}.")
        shortcut, top_k, dense = routed_settings[variant]
        set_moh(self.upcycled, identity_shortcut=shortcut, top_k=top_k)
        for module in moh_modules(self.upcycled):
            module.moh_dense_reference = dense
        return self.upcycled

    def trainable_parameters(self, variant: str) -> int:
        model = self.lora if variant == "lora" else self.upcycled
        return sum(param.numel() for param in model.parameters() if param.requires_grad)


def lora_rank_for(model: nn.Module, target_parameters: int) -> int:
    """Return the LoRA rank on q, k, v and o whose adapter parameter count is closest to ``target_parameters``."""
    per_rank = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            per_rank += module.in_features + module.out_features
    return max(1, round(target_parameters / per_rank))


def randomize_routers(model: nn.Module, input_ids: torch.Tensor, seed: int) -> None:
    """Draw router weights so each layer's router logits have a standard deviation of about 1.

    The init's bias (+1 for the original heads, -1 for the extras) stays, so originals are
    favoured but every head is chosen by some tokens. The scale comes from the RMS of
    each router's input on ``input_ids``.
    """
    rms: dict[nn.Module, float] = {}

    def record_rms(module, inputs):
        rms[module] = inputs[0].float().pow(2).mean().sqrt().item()

    hooks = [module.moh_router.register_forward_pre_hook(record_rms) for module in moh_modules(model)]
    set_moh(model, identity_shortcut=False)
    try:
        with torch.inference_mode():
            model(input_ids, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in moh_modules(model):
            router = module.moh_router
            scale = 1.0 / (max(rms[router], 1e-6) * router.in_features**0.5)
            weight = torch.randn(router.weight.shape, generator=generator) * scale
            router.weight.copy_(weight.to(router.weight))


def routing_statistics(models: BenchModels, input_ids: torch.Tensor) -> dict[str, Any]:
    """Share of extra heads among the selections and distinct head sets per layer, at top_k=H."""
    model = models.activate("routed")
    modules = list(moh_modules(model))
    for module in modules:
        module.moh_record_routing = True
    with torch.inference_mode():
        model(input_ids, logits_to_keep=1)
    extra_share, distinct = [], []
    for module in modules:
        mask = module.moh_last_routing.mask.reshape(-1, 2 * models.num_heads)
        extra_share.append(mask[:, models.num_heads :].float().sum().item() / mask.float().sum().item())
        distinct.append(len(torch.unique(mask, dim=0)))
        module.moh_record_routing = False
        module.moh_last_routing = None
    return {
        "extra_head_share": statistics.mean(extra_share),
        "distinct_head_sets_per_layer": {"min": min(distinct), "max": max(distinct)},
        "tokens": int(input_ids.numel()),
    }


def build_models(model_path: str, device: str, dtype: torch.dtype, seed: int) -> BenchModels:
    """Load three copies of the model and turn them into the stock, upcycled and LoRA variants."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def load() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()

    stock = load()
    upcycled = upcycle(load(), freeze_base=True)
    vocab = upcycled.config.vocab_size
    calibration = torch.randint(3, vocab, (1, 128), generator=torch.Generator().manual_seed(seed)).to(device)
    randomize_routers(upcycled, calibration, seed)

    target = sum(param.numel() for param in extra_parameters(upcycled).values())
    base = load()
    rank = lora_rank_for(base, target)
    lora_config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    lora = get_peft_model(base, lora_config).eval()
    return BenchModels(stock, upcycled, lora, rank)


def interleave(
    variants: tuple[str, ...], rounds: int, run: Callable[[str], dict[str, float]], warmup: bool = True
) -> dict[str, dict[str, dict]]:
    """Run every variant once per round, rotating the order, after one untimed run of each.

    Returns, per clock (``wall``, ``cpu``) and variant, the summary of the rounds.
    """
    if warmup:
        for variant in variants:
            run(variant)
    samples = {clock: {variant: Samples() for variant in variants} for clock in CLOCKS}
    for index in range(rounds):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            for clock, value in run(variant).items():
                samples[clock][variant].values.append(value)
    return {clock: {variant: found.summary() for variant, found in by_variant.items()} for clock, by_variant in samples.items()}


def random_ids(batch: int, length: int, vocab: int, seed: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator).to(device)


def measure_forward(models: BenchModels, settings: BenchSettings, device: str, sync: Synchronizer) -> list[dict]:
    """Prefill latency per (batch, length) cell; the logits of the last position only."""
    vocab = models.stock.config.vocab_size
    cells = []
    first = True
    for batch in settings.batch_sizes:
        for length in settings.seq_lens:
            ids = random_ids(batch, length, vocab, settings.seed + length, device)
            long = batch * length >= settings.long_tokens
            rounds = settings.long_repeats if long else settings.repeats
            variants = LONG_FORWARD_VARIANTS if long else FORWARD_VARIANTS

            def run(variant: str) -> float:
                model = models.activate(variant)
                with torch.inference_mode():
                    return time_call(lambda: model(input_ids=ids, logits_to_keep=1), sync)

            logger.info("forward: batch %d, length %d, %d rounds", batch, length, rounds)
            samples = interleave(variants, rounds, run, warmup=first)
            first = False
            cells.append({"batch": batch, "seq_len": length, "load": os.getloadavg(), "seconds": samples})
    return cells


def measure_generation(models: BenchModels, settings: BenchSettings, device: str, sync: Synchronizer) -> dict:
    """Greedy generation of a fixed number of new tokens with the KV cache, as new tokens per second."""
    vocab = models.stock.config.vocab_size
    prompt = random_ids(1, settings.gen_prompt_len, vocab, settings.seed + 1, device)
    new_tokens = settings.gen_new_tokens
    pad_token_id = models.stock.config.pad_token_id or 0

    def run(variant: str) -> float:
        model = models.activate(variant)
        with torch.inference_mode():
            seconds = time_call(
                lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id),
                sync,
            )
        return {clock: new_tokens / value for clock, value in seconds.items()}

    logger.info("generate: prompt %d, %d new tokens, %d rounds", prompt.shape[1], new_tokens, settings.gen_repeats)
    samples = interleave(GENERATE_VARIANTS, settings.gen_repeats, run)
    return {"prompt_len": prompt.shape[1], "new_tokens": new_tokens, "load": os.getloadavg(),
            "tokens_per_second": samples}


class PeakMemory:
    """Growth of memory use over the start of a block: device allocator on CUDA, peak RSS on Linux CPUs."""

    M_MMAP_THRESHOLD = -3  # glibc mallopt parameter

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = True
        self._libc = None
        if device.type != "cuda":
            try:
                self._libc = ctypes.CDLL("libc.so.6")
                self._libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
                self._status("VmHWM")
            except (OSError, AttributeError, ValueError) as error:
                logger.warning("Peak memory on CPU needs Linux with glibc (%s); training memory is not measured", error)
                self.available = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as status:
            match = re.search(rf"^{key}:\s+(\d+) kB", status.read(), re.MULTILINE)
        if match is None:
            raise ValueError(f"{key} not found in /proc/self/status")
        return int(match.group(1)) * 1024

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current RSS
            self._base = self._status("VmRSS")

    def growth(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        if not self.available:
            return None
        return self._status("VmHWM") - self._base


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class TrainingStep:
    """One forward, backward and AdamW step of a variant on a fixed batch, the labels being the inputs."""

    def __init__(self, models: BenchModels, variant: str, input_ids: torch.Tensor) -> None:
        self.models = models
        self.variant = variant
        self.input_ids = input_ids
        model = models.lora if variant == "lora" else models.upcycled
        self.parameters = [param for param in model.parameters() if param.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-5)

    def __call__(self) -> None:
        model = self.models.activate(self.variant)
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=self.input_ids, labels=self.input_ids).loss
        loss.backward()
        self.optimizer.step()
        model.eval()

    def resident_bytes(self) -> int:
        """Bytes alive between steps: every weight of the variant's model and its optimizer states."""
        model = self.models.lora if self.variant == "lora" else self.models.upcycled
        states = [value for state in self.optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
        return tensor_bytes(model.parameters()) + tensor_bytes(states)


def measure_training(models: BenchModels, settings: BenchSettings, device: str, sync: Synchronizer) -> dict:
    """Training step time (interleaved) and peak memory (one step per variant, after the timed ones)."""
    vocab = models.stock.config.vocab_size
    ids = random_ids(settings.train_batch, settings.train_seq, vocab, settings.seed + 2, device)
    steps = {variant: TrainingStep(models, variant, ids) for variant in TRAIN_VARIANTS}

    logger.info("train: batch %d, length %d, %d rounds", ids.shape[0], ids.shape[1], settings.train_repeats)
    samples = interleave(TRAIN_VARIANTS, settings.train_repeats, lambda variant: time_call(steps[variant], sync))

    memory = {}
    peak = PeakMemory(torch.device(device))
    for variant, step in steps.items():
        peak.start()
        step()
        growth = peak.growth()
        resident = step.resident_bytes()
        memory[variant] = {"resident_bytes": resident, "growth_bytes": growth,
                           "peak_bytes": None if growth is None else resident + growth}
    logits_bytes = ids.numel() * vocab * 4  # fp32 logits, as the loss upcasts them
    return {
        "batch": ids.shape[0], "seq_len": ids.shape[1], "load": os.getloadavg(),
        "seconds": samples,
        "memory": memory,
        "trainable_parameters": {variant: models.trainable_parameters(variant) for variant in TRAIN_VARIANTS},
        "logits_bytes": logits_bytes,
    }


PROFILE_CLASSES = (
    "LM head",
    "MLP",
    "attention projections",
    "LoRA adapters",
    "router and routing",
    "row gather/scatter",
    "attention (QK^T, softmax, V)",
    "other",
)
_MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm")
_ROUTING_OPS = ("aten::topk", "aten::_softmax", "aten::softmax", "aten::nonzero", "aten::bincount", "aten::cumsum",
                "aten::scatter", "aten::scatter_")
_GATHER_OPS = ("aten::index_select", "aten::index_copy", "aten::index_add", "aten::index_add_", "aten::index",
               "aten::index_put_", "aten::scatter_add_", "aten::split_with_sizes")


def classify_operator(name: str, shapes: list, config, lora_rank: int) -> str:
    """Return the profile class of one operator, from its name and, for matmuls, its weight's shape."""
    if "attention" in name:
        return "attention (QK^T, softmax, V)"
    if name in _ROUTING_OPS:
        return "router and routing"
    if name in _GATHER_OPS:
        return "row gather/scatter"
    if name not in _MATMUL_OPS:
        return "other"
    dims = {dim for shape in shapes if isinstance(shape, (list, tuple)) and len(shape) == 2 for dim in shape}
    if config.vocab_size in dims:
        return "LM head"
    if config.intermediate_size in dims:
        return "MLP"
    if 2 * config.num_attention_heads in dims and config.hidden_size in dims:
        return "router and routing"
    if lora_rank in dims:
        return "LoRA adapters"
    if len(shapes) >= 2 and any(isinstance(shape, (list, tuple)) and len(shape) == 4 for shape in shapes):
        return "attention (QK^T, softmax, V)"  # eager attention's batched matmuls
    return "attention projections"


def _profile_classes(
    models: BenchModels, device: str, run: Callable[[nn.Module, Any], Any], prepare: Callable[[nn.Module], Any] = None
) -> dict[str, dict[str, float]]:
    """Seconds of self time per operator class of ``run(model, prepare(model))``, for each profiled variant.

    ``prepare`` runs before the profiler starts, so its work is not counted.
    """
    from torch.profiler import ProfilerActivity, profile

    on_device = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    breakdown = {}
    for variant in PROFILE_VARIANTS:
        model = models.activate(variant)
        with torch.inference_mode():
            state = prepare(model) if prepare is not None else None
            with profile(activities=activities, record_shapes=True) as profiler:
                run(model, state)
        totals = dict.fromkeys(PROFILE_CLASSES, 0.0)
        for event in profiler.events():
            self_us = event.self_device_time_total if on_device else event.self_cpu_time_total
            if self_us:
                label = classify_operator(event.name, event.input_shapes, models.stock.config, models.lora_rank)
                totals[label] += self_us / 1e6
        breakdown[variant] = totals
    return breakdown


def profile_forward(models: BenchModels, settings: BenchSettings, device: str) -> dict:
    """Self time of each operator class in one forward with the logits of every position, and in decoding.

    The decoding profile covers ``DECODE_PROFILE_STEPS`` single-token steps after a prefill of
    ``gen_prompt_len`` tokens, as in the generation measurement; the prefill is not profiled.
    """
    vocab = models.stock.config.vocab_size
    ids = random_ids(1, settings.profile_seq, vocab, settings.seed + 3, device)
    forward = _profile_classes(models, device, lambda model, _: model(input_ids=ids))
    logger.info("profile: forward of %d tokens done", ids.shape[1])

    prompt = random_ids(1, settings.gen_prompt_len, vocab, settings.seed + 1, device)

    def prefill(model: nn.Module):
        return model(input_ids=prompt, use_cache=True, logits_to_keep=1)

    def decode(model: nn.Module, output) -> None:
        for _ in range(DECODE_PROFILE_STEPS):
            token = output.logits[:, -1:].argmax(dim=-1)
            output = model(input_ids=token, cache=output.past_key_values, use_cache=True)

    decoding = _profile_classes(models, device, decode, prepare=prefill)
    logger.info("profile: %d decoding steps done", DECODE_PROFILE_STEPS)

    on_device = torch.device(device).type == "cuda"
    return {"batch": 1, "seq_len": settings.profile_seq, "seconds": forward, "decode_seconds": decoding,
            "decode_steps": DECODE_PROFILE_STEPS, "decode_prompt_len": prompt.shape[1],
            "clock": "device self time" if on_device else "CPU self time"}


def run_benchmark(model_path: str, device: str, dtype: torch.dtype, settings: BenchSettings) -> dict:
    """Build the variants and run every measurement; return the results as plain data."""
    torch.manual_seed(settings.seed)
    sync = Synchronizer(torch.device(device))
    load_start = os.getloadavg()
    models = build_models(model_path, device, dtype, settings.seed)
    vocab = models.stock.config.vocab_size

    config = models.stock.config
    results: dict[str, Any] = {
        "model": {
            "id": getattr(models.stock, "name_or_path", model_path), "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "vocab": vocab, "parameters": sum(p.numel() for p in models.stock.parameters()),
            "intermediate": config.intermediate_size, "sliding_window": getattr(config, "sliding_window", None),
            "layer_types": list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers),
        },
        "clock": settings.clock,
        "lora_rank": models.lora_rank,
        "routing": routing_statistics(models, random_ids(1, 512, vocab, settings.seed + 4, device)),
        "forward": measure_forward(models, settings, device, sync),
        "generate": measure_generation(models, settings, device, sync),
    }
    results["train"] = measure_training(models, settings, device, sync)
    results["profile"] = profile_forward(models, settings, device)
    results["load"] = {"start": load_start, "end": os.getloadavg()}
    return results

