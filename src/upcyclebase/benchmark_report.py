"""Targets, ratios, the record page (Markdown), the JSON file and the plot of a benchmark run."""

from __future__ import annotations

import json
import operator
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .benchmark import CLOCKS, PROFILE_CLASSES, VARIANTS


@dataclass(frozen=True)
class Target:
    """A ratio of two measurements and the bound it should meet."""

    name: str
    section: str  # forward, generate, train_time or train_memory
    variant: str
    reference: str
    comparison: str  # "<=", "<" or ">="
    bound: float


TARGETS = (
    Target("identity shortcut forward / stock forward", "forward", "identity", "stock", "<=", 1.01),
    Target("routed top_k=H forward / stock forward", "forward", "routed", "stock", "<=", 1.05),
    Target("routed top_k=H/2 forward / stock forward", "forward", "routed_half", "stock", "<", 1.00),
    Target("routed training step / LoRA training step", "train_time", "routed", "lora", "<=", 1.00),
    Target("routed generation tokens/s / stock tokens/s", "generate", "routed", "stock", ">=", 0.90),
    Target("routed training peak memory / LoRA training peak memory", "train_memory", "routed", "lora", "<=", 1.10),
)
_COMPARE = {"<=": operator.le, "<": operator.lt, ">=": operator.ge}

# Remedy for each profile class, quoted in the gap analysis of a missed target
REMEDIES = {
    "router and routing": "fuse the router matmul, softmax, top-k and row plan (nonzero, bincount, cumsum) into one "
    "kernel, or run them for all layers' tokens with fewer, larger calls; at short lengths their per-call overhead dominates",
    "row gather/scatter": "read hidden rows by index inside a grouped GEMM (one kernel for all heads, as MoE kernels do) "
    "instead of copying rows into head order and adding outputs back per token",
    "attention projections": "run the per-head matmuls as one grouped GEMM; several small matmuls reach lower BLAS "
    "efficiency than the stock model's single q_proj and o_proj",
    "attention (QK^T, softmax, V)": "the attention kernel sees the same number of query rows as the stock model at "
    "top_k=H; a gap here is noise or a different kernel choice",
    "other": "the fast path adds the gate multiply, the zero-filled slot tensor and the bias adds; fusing them into "
    "the projections removes those passes over memory",
    "LoRA adapters": "only in the LoRA variant",
}


def forward_cell(results: dict, batch: int = 1, seq_len: int = 512) -> dict:
    """Return the forward cell of the targets: batch 1 at length 512, else the batch-1 cell nearest to it."""
    cells = [cell for cell in results["forward"] if cell["batch"] == batch] or results["forward"]
    return min(cells, key=lambda cell: abs(cell["seq_len"] - seq_len))


def _section(results: dict, target: Target, clock: str) -> tuple[dict, dict, str]:
    """Return the two summaries a target compares and the unit they are in."""
    if target.section == "forward":
        seconds = forward_cell(results)["seconds"][clock]
        return seconds[target.variant], seconds[target.reference], "s"
    if target.section == "generate":
        rates = results["generate"]["tokens_per_second"][clock]
        return rates[target.variant], rates[target.reference], "tokens/s"
    if target.section == "train_time":
        seconds = results["train"]["seconds"][clock]
        return seconds[target.variant], seconds[target.reference], "s"
    memory = results["train"]["memory"]
    peak = {variant: memory[variant]["peak_bytes"] for variant in (target.variant, target.reference)}
    if None in peak.values():
        return None, None, "bytes"
    as_summary = {variant: {"median": value, "min": value, "max": value} for variant, value in peak.items()}
    return as_summary[target.variant], as_summary[target.reference], "bytes"


def evaluate_targets(results: dict) -> list[dict]:
    """Compute each target's ratio of medians, its range over the repeats, and whether it is met.

    ``met`` is judged on the run's clock (``results["clock"]``); ``other_ratio`` is the
    ratio on the other clock, where the target has one.
    """
    clock = results["clock"]
    other = next(name for name in CLOCKS if name != clock)
    rows = []
    for target in TARGETS:
        found, reference, unit = _section(results, target, clock)
        row = {"name": target.name, "target": f"{target.comparison} {target.bound:.2f}", "unit": unit, "clock": clock}
        if found is None:
            rows.append({**row, "ratio": None, "met": None, "low": None, "high": None, "other_ratio": None})
            continue
        ratio = found["median"] / reference["median"]
        other_ratio = None
        if target.section != "train_memory":
            other_found, other_reference, _ = _section(results, target, other)
            other_ratio = other_found["median"] / other_reference["median"]
        row.update(
            ratio=ratio,
            low=found["min"] / reference["max"],
            high=found["max"] / reference["min"],
            met=bool(_COMPARE[target.comparison](ratio, target.bound)),
            other_ratio=other_ratio,
        )
        rows.append(row)
    return rows


def profile_gaps(
    results: dict, variant: str, reference: str, limit: int = 3, key: str = "seconds"
) -> list[tuple[str, float]]:
    """Return the profile classes in which ``variant`` spends the most time over ``reference``, largest first.

    The LM head and the MLP do the same work in every variant, so a difference there is
    noise of the single profiled run and is left out.
    """
    seconds = results["profile"][key]
    if variant not in seconds or reference not in seconds:
        return []
    same_work = ("LM head", "MLP")
    deltas = [
        (label, seconds[variant][label] - seconds[reference][label]) for label in PROFILE_CLASSES if label not in same_work
    ]
    return sorted((item for item in deltas if item[1] > 0), key=lambda item: -item[1])[:limit]


def expected_macs(model: dict, variant: str, seq_len: int, lora_rank: int) -> float:
    """Estimate the multiply-adds of a prefill forward (logits of the last position only) from the model's shapes.

    Counts the matmuls only: projections, attention scores and values (causal, with the
    sliding window on sliding layers), MLP, router, LoRA adapters and one row of the LM head.
    """
    hidden, heads, kv_heads, head_dim = model["hidden"], model["heads"], model["kv_heads"], model["head_dim"]
    active = {"routed": heads, "routed_half": max(1, heads // 2), "routed_dense": 2 * heads}.get(variant, heads)
    per_token = (
        2 * active * head_dim * hidden  # q and o projections of the computed heads
        + 2 * kv_heads * head_dim * hidden  # k and v
        + 3 * hidden * model["intermediate"]  # gate, up and down projections
    )
    if variant.startswith("routed"):
        per_token += hidden * 2 * heads
    if variant == "lora":
        per_token += lora_rank * (2 * (hidden + heads * head_dim) + 2 * (hidden + kv_heads * head_dim))

    total = per_token * seq_len * model["layers"]
    for layer_type in model["layer_types"]:
        window = model["sliding_window"] if layer_type == "sliding_attention" and model["sliding_window"] else seq_len
        keys = sum(min(position, window) for position in range(1, seq_len + 1))
        total += 2 * active * head_dim * keys  # QK^T and attention x V
    return total + model["vocab"] * hidden


def _expected_lines(results: dict) -> list[str]:
    cell = forward_cell(results)
    model, rank = results["model"], results["lora_rank"]
    stock = expected_macs(model, "stock", cell["seq_len"], rank)
    lines = [
        f"Multiply-adds of one prefill forward at batch 1, length {cell['seq_len']}, from the model's shapes (matmuls",
        "only), against the measured ratio of medians on both clocks:",
        "",
        "| variant | multiply-adds (G) | expected ratio | measured, wall | measured, cpu |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        if variant not in cell["seconds"]["wall"]:
            continue
        macs = expected_macs(model, variant, cell["seq_len"], rank)
        measured = " | ".join(
            f"{cell['seconds'][clock][variant]['median'] / cell['seconds'][clock]['stock']['median']:.3f}" for clock in CLOCKS
        )
        lines.append(f"| {variant} | {macs / 1e9:.2f} | {macs / stock:.3f} | {measured} |")
    return lines


def _ms(summary: dict) -> str:
    return f"{summary['median'] * 1e3:.1f} ({summary['min'] * 1e3:.1f}-{summary['max'] * 1e3:.1f})"


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.3f}"


def _load(values) -> str:
    return " / ".join(f"{value:.2f}" for value in values)


def _target_lines(results: dict, targets: list[dict]) -> list[str]:
    clock = results["clock"]
    other = next(name for name in CLOCKS if name != clock)
    lines = [
        f"| ratio | target | measured ({clock} clock, median) | range over repeats | met | {other} clock |",
        "|---|---|---|---|---|---|",
    ]
    for row in targets:
        if row["ratio"] is None:
            lines.append(f"| {row['name']} | {row['target']} | not measured | | n/a | |")
            continue
        met = "yes" if row["met"] else "**no**"
        other_ratio = "" if row["other_ratio"] is None else f"{row['other_ratio']:.3f}"
        lines.append(
            f"| {row['name']} | {row['target']} | {row['ratio']:.3f} | {row['low']:.3f}-{row['high']:.3f} | {met} | {other_ratio} |"
        )
    return lines


def _gap_lines(results: dict, targets: list[dict]) -> list[str]:
    lines = []
    for target, row in zip(TARGETS, targets):
        if row["met"] is not False:
            continue
        lines.append(f"- **{row['name']}**: {row['ratio']:.3f}, target {row['target']}.")
        bound = float(row["target"].split()[-1])
        if row["low"] is not None and row["low"] <= bound <= row["high"]:
            lines.append("  The bound lies within the range over the repeats, so this run cannot tell it from noise.")
        if target.section == "train_memory":
            memory = results["train"]["memory"]
            found, reference = memory[target.variant], memory[target.reference]
            lines.append(
                f"  Resident {_gib(found['resident_bytes'])} vs {_gib(reference['resident_bytes'])} GiB; growth during "
                f"the step {_gib(found['growth_bytes'])} vs {_gib(reference['growth_bytes'])} GiB."
            )
            continue
        if target.variant == "identity":
            lines.append(
                "  The identity shortcut runs the original attention code; its only extra work is one Python call per "
                "layer, so a gap here is the noise of this run, not work to remove."
            )
            continue
        key, where = ("decode_seconds", "profiled decoding steps") if target.section == "generate" else ("seconds", "profiled forward")
        gaps = profile_gaps(results, target.variant, target.reference, key=key)
        if not gaps:
            lines.append(f"  The {where} show no operator class slower than in `{target.reference}`.")
        for label, delta in gaps:
            lines.append(f"  - {label}: +{delta * 1e3:.1f} ms in the {where}. To close: {REMEDIES[label]}.")
    return lines or ["Every target is met in this run."]


def _environment_lines(environment: dict) -> list[str]:
    return [
        f"- Command: `{environment['command']}`",
        f"- Date: {environment['date']}",
        f"- Machine: {environment['machine']}",
        f"- Device: {environment['device']}, dtype {environment['dtype']}, torch threads {environment['threads']}",
        f"- Versions: {', '.join(f'{name} {version}' for name, version in environment['versions'].items())}",
        f"- Load average (1, 5, 15 min) at start: {_load(environment['load_start'])}; at end: {_load(environment['load_end'])}",
        f"- Run time: {environment['wall_seconds']:.0f} s",
    ]


def render_markdown(results: dict, environment: dict, settings: dict) -> str:
    """Render the record page: setup, targets, every table, the profile and the gap analysis."""
    targets = evaluate_targets(results)
    model = results["model"]
    routing = results["routing"]
    lines = [
        "# Benchmarks: routed heads against the stock model and LoRA",
        "",
        "Written by `upcyclebase bench`; rerun the command below to refresh it. Figures are medians over interleaved",
        "repeats, with min-max in brackets. Times in ms unless marked.",
        "",
        "## Setup",
        "",
        *_environment_lines(environment),
        f"- Model: {model['id']} ({model['layers']} layers, hidden {model['hidden']}, {model['heads']} query heads, "
        f"{model['kv_heads']} key/value heads, head dim {model['head_dim']}, vocabulary {model['vocab']}, "
        f"{model['parameters'] / 1e6:.1f}M parameters)",
        f"- Trainable parameters: routed {results['train']['trainable_parameters']['routed']:,} "
        f"(extra banks and routers), LoRA {results['train']['trainable_parameters']['lora']:,} (rank {results['lora_rank']})",
        f"- Routers: random weights scaled so router logits have a standard deviation of about 1 over the init's "
        f"+-1 bias; on {routing['tokens']} random tokens at top_k=H, extra heads take {routing['extra_head_share']:.0%} "
        f"of the selections and each layer sees {routing['distinct_head_sets_per_layer']['min']}-"
        f"{routing['distinct_head_sets_per_layer']['max']} distinct head sets.",
        f"- Settings: `{json.dumps(settings)}`",
        "",
        "## Targets",
        "",
        f"Forward ratios use batch {forward_cell(results)['batch']}, length {forward_cell(results)['seq_len']}.",
        "",
        *_target_lines(results, targets),
        "",
        *_expected_lines(results),
        "",
        "### Gaps",
        "",
        *_gap_lines(results, targets),
        "",
        *_forward_lines(results),
        "",
        *_generate_lines(results),
        "",
        *_train_lines(results),
        "",
        *_profile_lines(results),
        "",
        "## Method",
        "",
        "- Variants: " + "; ".join(f"`{key}` = {label}" for key, label in VARIANTS.items()) + ".",
        "- Every round runs each variant once, in an order that rotates between rounds, after one untimed warm-up run.",
        "- Clocks: `wall` is elapsed time; `cpu` is the CPU time of the whole process (all threads, `time.process_time`).",
        "  On a machine shared with other jobs the CPU clock leaves out the time other processes hold the cores, so with",
        "  one torch thread it is the steadier measure of the work; with several threads it also counts OpenMP threads",
        f"  spinning while they wait. The targets are judged on the `{results['clock']}` clock.",
        "- Forward: one prefill forward returning the logits of the last position only (`logits_to_keep=1`), so the",
        "  262k-vocabulary LM head costs one row. The profile below uses the logits of every position.",
        "- Generation: greedy, batch 1, a fixed number of new tokens with the default KV cache; tokens/s counts the new",
        "  tokens over the whole `generate` call, prefill included.",
        "- Training step: `model(input_ids, labels=input_ids).loss`, backward and AdamW (lr 1e-5) over the trainable",
        "  parameters only; the base weights are frozen in both the routed and the LoRA model.",
        "- Peak memory of a step: bytes of the variant's tensors alive when the step starts (every weight and the",
        "  optimizer states) plus the largest growth during the step. On CPU the growth is that of the process's peak",
        "  resident set size (Linux `VmHWM`, reset through `/proc/self/clear_refs` before the step), with glibc's",
        "  `mallopt(M_MMAP_THRESHOLD, 64 KiB)` so freed tensors return to the system. On CUDA it is",
        "  `torch.cuda.max_memory_allocated` minus the memory allocated at the start.",
        "- Profile: `torch.profiler` self time of each operator in one forward (batch 1, every position's logits), each",
        "  operator put in a class by its name and, for matmuls, by its weight's shape.",
    ]
    return "\n".join(lines) + "\n"


def _forward_variants(results: dict) -> list[str]:
    """Return every variant measured in some forward cell, in the order of ``VARIANTS``."""
    found = {variant for cell in results["forward"] for variant in cell["seconds"]["wall"]}
    return [variant for variant in VARIANTS if variant in found]


def _forward_lines(results: dict) -> list[str]:
    variants = _forward_variants(results)
    lines = []
    for clock in CLOCKS:
        header = "| batch | length | rounds | " + " | ".join(variants) + " | load (1 min) |"
        lines += [f"## Forward latency (ms, {clock} clock)", "", header, "|" + "---|" * (len(variants) + 4)]
        for cell in results["forward"]:
            seconds = cell["seconds"][clock]
            values = " | ".join(_ms(seconds[variant]) if variant in seconds else "-" for variant in variants)
            rounds = len(seconds["stock"]["values"])
            lines.append(f"| {cell['batch']} | {cell['seq_len']} | {rounds} | {values} | {cell['load'][0]:.2f} |")
        lines += ["", f"Ratio of medians against the stock model ({clock} clock):", "",
                  "| batch | length | " + " | ".join(variants[1:]) + " |", "|" + "---|" * (len(variants) + 1)]
        for cell in results["forward"]:
            seconds = cell["seconds"][clock]
            ratios = " | ".join(
                f"{seconds[variant]['median'] / seconds['stock']['median']:.3f}" if variant in seconds else "-"
                for variant in variants[1:]
            )
            lines.append(f"| {cell['batch']} | {cell['seq_len']} | {ratios} |")
        lines.append("")
    lines.append("A dash marks a variant not run in that cell: cells of 2048 tokens or more skip the identity shortcut")
    lines.append("and the dense reference to keep the run short.")
    return lines


def _generate_lines(results: dict) -> list[str]:
    generate = results["generate"]
    rates = generate["tokens_per_second"]
    lines = [
        f"## Generation (tokens/s, prompt {generate['prompt_len']}, {generate['new_tokens']} new tokens, "
        f"load {generate['load'][0]:.2f})",
        "",
        "| variant | tokens/s (wall clock) | ratio to stock | tokens per CPU second | ratio to stock |",
        "|---|---|---|---|---|",
    ]
    for variant in rates["wall"]:
        cells = []
        for clock in CLOCKS:
            summary = rates[clock][variant]
            ratio = summary["median"] / rates[clock]["stock"]["median"]
            cells.append(f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f}) | {ratio:.3f}")
        lines.append(f"| {variant} | {' | '.join(cells)} |")
    return lines


def _train_lines(results: dict) -> list[str]:
    train = results["train"]
    lines = [
        f"## Training step (batch {train['batch']}, length {train['seq_len']}, load {train['load'][0]:.2f})",
        "",
        "| variant | trainable parameters | step (s, wall) | step (CPU s) | peak memory (GiB) | resident at start (GiB) "
        "| growth during step (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in train["seconds"]["wall"]:
        memory = train["memory"][variant]
        times = " | ".join(
            f"{summary['median']:.2f} ({summary['min']:.2f}-{summary['max']:.2f})"
            for summary in (train["seconds"][clock][variant] for clock in CLOCKS)
        )
        lines.append(
            f"| {variant} | {train['trainable_parameters'][variant]:,} | {times} | {_gib(memory['peak_bytes'])} | "
            f"{_gib(memory['resident_bytes'])} | {_gib(memory['growth_bytes'])} |"
        )
    lines += ["", f"The fp32 logits of one step alone take {_gib(train['logits_bytes'])} GiB."]
    return lines


def _profile_lines(results: dict) -> list[str]:
    profile = results["profile"]
    titles = {
        "seconds": f"one forward, batch {profile['batch']}, length {profile['seq_len']}, logits of every position",
        "decode_seconds": f"{profile['decode_steps']} decoding steps after a prompt of {profile['decode_prompt_len']} tokens",
    }
    lines = []
    for key, title in titles.items():
        breakdown = profile[key]
        variants = list(breakdown)
        lines += [
            f"## Profile (ms of {profile['clock']}, {title})",
            "",
            "| class | " + " | ".join(variants) + " |",
            "|" + "---|" * (len(variants) + 1),
        ]
        for label in PROFILE_CLASSES:
            values = " | ".join(f"{breakdown[variant][label] * 1e3:.1f}" for variant in variants)
            lines.append(f"| {label} | {values} |")
        totals = " | ".join(f"{sum(breakdown[variant].values()) * 1e3:.1f}" for variant in variants)
        lines += [f"| total | {totals} |", ""]
    return lines[:-1]


def plot(results: dict, path: Path) -> None:
    """Forward ratios, generation, training time and memory, and the profile, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 3, figsize=(18, 9))

    clock = results["clock"]
    forward = results["forward"]
    variants = _forward_variants(results)[1:]
    width = 0.8 / len(variants)
    for index, variant in enumerate(variants):
        seconds = [cell["seconds"][clock] for cell in forward]
        ratios = [cell[variant]["median"] / cell["stock"]["median"] if variant in cell else 0.0 for cell in seconds]
        positions = [cell_index + index * width for cell_index in range(len(forward))]
        axes[0, 0].bar(positions, ratios, width, label=variant)
    axes[0, 0].axhline(1.0, color="black", linewidth=0.8)
    axes[0, 0].set_xticks([i + 0.4 - width / 2 for i in range(len(forward))])
    axes[0, 0].set_xticklabels([f"B{cell['batch']} T{cell['seq_len']}" for cell in forward], rotation=30)
    axes[0, 0].set_title(f"forward latency / stock (median, {clock} clock)")
    axes[0, 0].legend(fontsize=7)

    _bar_with_spread(axes[0, 1], results["generate"]["tokens_per_second"][clock], 1.0, f"generation tokens/s ({clock})")
    _bar_with_spread(axes[0, 2], results["train"]["seconds"][clock], 1.0, f"training step (s, {clock})")
    memory = {variant: values["peak_bytes"] for variant, values in results["train"]["memory"].items()}
    if None not in memory.values():
        axes[1, 0].bar(list(memory), [value / 2**30 for value in memory.values()])
    axes[1, 0].set_title("training peak memory (GiB)")
    axes[1, 0].tick_params(axis="x", rotation=30)

    profile = results["profile"]["seconds"]
    bottoms = [0.0] * len(profile)
    for label in PROFILE_CLASSES:
        heights = [profile[variant][label] * 1e3 for variant in profile]
        axes[1, 1].bar(list(profile), heights, bottom=bottoms, label=label)
        bottoms = [bottom + height for bottom, height in zip(bottoms, heights)]
    axes[1, 1].set_title(f"profile, one forward, T={results['profile']['seq_len']} (ms)")
    axes[1, 1].tick_params(axis="x", rotation=30)
    axes[1, 1].legend(fontsize=7)

    targets = evaluate_targets(results)
    names = [row["name"].replace(" / ", "\n/ ") for row in targets if row["ratio"] is not None]
    ratios = [row["ratio"] for row in targets if row["ratio"] is not None]
    colors = ["tab:green" if row["met"] else "tab:red" for row in targets if row["ratio"] is not None]
    axes[1, 2].barh(names, ratios, color=colors)
    axes[1, 2].axvline(1.0, color="black", linewidth=0.8)
    axes[1, 2].tick_params(axis="y", labelsize=6)
    axes[1, 2].set_title("target ratios (green: met)")

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _bar_with_spread(axis, summaries: dict, scale: float, title: str) -> None:
    names = list(summaries)
    medians = [summaries[name]["median"] * scale for name in names]
    lower = [(summaries[name]["median"] - summaries[name]["min"]) * scale for name in names]
    upper = [(summaries[name]["max"] - summaries[name]["median"]) * scale for name in names]
    axis.bar(names, medians, yerr=[lower, upper], capsize=3)
    axis.set_title(f"{title}, median, min-max")
    axis.tick_params(axis="x", rotation=30)


def describe_machine() -> str:
    """CPU model and core count from /proc/cpuinfo where present, else what platform reports."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = ""
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = f", {pages / 2**30:.0f} GiB RAM"
    except (ValueError, OSError):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs{memory}, {platform.system()} {platform.release()}"


def write_outputs(results: dict, environment: dict, settings: dict, output_dir: Path) -> dict[str, Path]:
    """Write BENCHMARKS.md, benchmark.json and benchmark.png into ``output_dir``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"page": output_dir / "BENCHMARKS.md", "json": output_dir / "benchmark.json", "plot": output_dir / "benchmark.png"}
    payload = {"environment": environment, "settings": settings, "targets": evaluate_targets(results), "results": results}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    paths["page"].write_text(render_markdown(results, environment, settings))
    plot(results, paths["plot"])
    return paths


def summary_lines(results: dict) -> list[str]:
    """Format one line per target for the terminal."""
    lines = []
    for row in evaluate_targets(results):
        if row["ratio"] is None:
            lines.append(f"{row['name']}: not measured")
        else:
            lines.append(f"{row['name']}: {row['ratio']:.3f} (target {row['target']}, {'met' if row['met'] else 'NOT met'})")
    return lines

