"""Reports of an evaluation run: JSON, Markdown table, per-subject CSV and a bar chart.

Files written to the output folder:

    results.json          run settings and, per variant, everything lm-eval returns except the samples
    samples/<variant>.jsonl   lm-eval's per-question samples (prompts, log-likelihoods, metrics)
    results.md            accuracy ± standard error per variant and MMLU category, differences to the baseline
    mmlu_per_subject.csv  one row per subject and variant
    mmlu_chart.png        accuracy per MMLU category and perplexity, one bar per variant

Accuracies and standard errors of a set of questions (a subject, a category, all of MMLU)
are computed here from the per-question results: the mean and the sample standard
deviation over sqrt(n), the formula lm-eval uses for one task. For a category this pools
the questions, so it differs slightly from lm-eval's group stderr, which pools per-subject
variances; lm-eval's own numbers are in results.json.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .evaluation import QuestionScore, VariantResult, question_scores
from .mmlu import SUBJECT_CATEGORIES

logger = logging.getLogger(__name__)

CATEGORY_TITLES = {"stem": "STEM", "humanities": "humanities", "social_sciences": "social sciences", "other": "other"}
JSON_NAME = "results.json"
TABLE_NAME = "results.md"
CSV_NAME = "mmlu_per_subject.csv"
CHART_NAME = "mmlu_chart.png"
SAMPLES_DIR = "samples"


@dataclass
class Accuracy:
    """Accuracy over a set of questions, with its standard error."""

    questions: int
    accuracy: float
    stderr: float

    @classmethod
    def of(cls, correct: list[bool]) -> Accuracy:
        n = len(correct)
        if n == 0:
            return cls(0, math.nan, math.nan)
        mean = sum(correct) / n
        if n == 1:
            return cls(1, mean, math.nan)
        variance = sum((value - mean) ** 2 for value in correct) / (n - 1)
        return cls(n, mean, math.sqrt(variance / n))


def mmlu_subject(task: str) -> str | None:
    subject = task.removeprefix("mmlu_")
    return subject if task.startswith("mmlu_") and subject in SUBJECT_CATEGORIES else None


def mmlu_breakdown(scores: dict[tuple[str, int], QuestionScore]) -> dict[str, dict[str, Accuracy]]:
    """Accuracy of all MMLU questions, per category and per subject: {"all": {...}, "category": {...}, "subject": {...}}."""
    by_subject: dict[str, list[bool]] = {}
    for (task, _), score in scores.items():
        subject = mmlu_subject(task)
        if subject is not None:
            by_subject.setdefault(subject, []).append(score.correct)
    by_category: dict[str, list[bool]] = {}
    for subject, correct in by_subject.items():
        by_category.setdefault(SUBJECT_CATEGORIES[subject], []).extend(correct)
    every = [value for correct in by_subject.values() for value in correct]
    return {
        "all": {"mmlu": Accuracy.of(every)} if every else {},
        "category": {category: Accuracy.of(by_category[category]) for category in CATEGORY_TITLES if category in by_category},
        "subject": {subject: Accuracy.of(by_subject[subject]) for subject in sorted(by_subject)},
    }


def agreement(scores: dict[tuple[str, int], QuestionScore], baseline: dict[tuple[str, int], QuestionScore]) -> dict[str, Any]:
    """Compare two runs question by question: same predicted answer, largest log-likelihood difference."""
    shared = sorted(set(scores) & set(baseline))
    same = sum(scores[key].prediction == baseline[key].prediction for key in shared)
    max_diff = max(
        (abs(a - b) for key in shared for a, b in zip(scores[key].loglikelihoods, baseline[key].loglikelihoods)),
        default=0.0,
    )
    return {"questions": len(shared), "same_prediction": same, "max_abs_loglikelihood_diff": max_diff}


def task_metrics(results: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """(acc, acc stderr) of every task and group outside MMLU's subjects and groups that reports acc."""
    metrics = {}
    for task, values in results.get("results", {}).items():
        if task.startswith("mmlu") or "acc,none" not in values:
            continue
        stderr = values.get("acc_stderr,none")
        metrics[task] = (float(values["acc,none"]), float(stderr) if isinstance(stderr, (int, float)) else math.nan)
    return metrics


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@dataclass
class Summary:
    """The numbers of one variant that the table, CSV and chart show."""

    result: VariantResult
    scores: dict[tuple[str, int], QuestionScore]
    mmlu: dict[str, dict[str, Accuracy]]
    versus_baseline: dict[str, Any] | None

    @property
    def name(self) -> str:
        return self.result.variant.name


def summarise(results: list[VariantResult]) -> list[Summary]:
    """Per-question scores and MMLU breakdowns; the first result is the baseline."""
    summaries = []
    for index, result in enumerate(results):
        scores = question_scores(result.lm_eval)
        versus = agreement(scores, summaries[0].scores) if index > 0 else None
        summaries.append(Summary(result, scores, mmlu_breakdown(scores), versus))
    return summaries


# ---- Files -------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    """Make lm-eval's numpy numbers, sets, tuples and functions JSON-serialisable."""
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)


def write_json(summaries: list[Summary], settings: dict[str, Any], output_dir: Path) -> Path:
    variants = []
    for summary in summaries:
        result = summary.result
        lm_eval_output = {key: value for key, value in result.lm_eval.items() if key != "samples"}
        samples_file = Path(SAMPLES_DIR) / f"{_slug(summary.name)}.jsonl"
        with (output_dir / samples_file).open("w", encoding="utf-8") as handle:
            for task, samples in result.samples.items():
                for sample in samples:
                    handle.write(json.dumps({"task": task, **sample}, default=_json_default, ensure_ascii=False) + "\n")
        variants.append({
            **result.variant.describe(),
            "seconds": result.seconds,
            "questions": result.questions,
            "seconds_per_question": result.seconds_per_question,
            "perplexity": asdict(result.perplexity) if result.perplexity else None,
            "mmlu": {part: {key: asdict(value) for key, value in values.items()} for part, values in summary.mmlu.items()},
            "versus_baseline": summary.versus_baseline,
            "samples_file": str(samples_file),
            "lm_eval": lm_eval_output,
        })
    path = output_dir / JSON_NAME
    path.write_text(json.dumps({"settings": settings, "variants": variants}, indent=2, default=_json_default) + "\n")
    return path


def _percent(value: Accuracy | None) -> str:
    if value is None or math.isnan(value.accuracy):
        return "-"
    if math.isnan(value.stderr):
        return f"{100 * value.accuracy:.1f}"
    return f"{100 * value.accuracy:.1f} ± {100 * value.stderr:.1f}"


def _difference(value: Accuracy | None, baseline: Accuracy | None) -> str:
    if value is None or baseline is None:
        return "-"
    return f"{100 * (value.accuracy - baseline.accuracy):+.1f}"


def format_table(summaries: list[Summary], settings: dict[str, Any]) -> str:
    """Markdown: MMLU accuracy (%) per variant and category, perplexity and timing, then other tasks."""
    baseline = summaries[0]
    categories = [category for category in CATEGORY_TITLES if category in baseline.mmlu["category"]]
    lines = [f"# Evaluation of {settings.get('model_id')}", ""]
    described = ", ".join(f"{key} {settings[key]}" for key in ("tasks", "num_fewshot", "limit", "device", "dtype", "mmlu_source") if key in settings)
    lines += [f"Settings: {described}.", ""]

    if baseline.mmlu["all"]:
        header = ["variant", "questions", "MMLU acc (%)", "Δ vs baseline", *(CATEGORY_TITLES[c] for c in categories),
                  "same answer as baseline", "max abs Δ log-lik", "perplexity", "s/question"]
        lines += ["## MMLU", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for summary in summaries:
            overall = summary.mmlu["all"].get("mmlu")
            versus = summary.versus_baseline
            row = [
                summary.name,
                str(overall.questions if overall else 0),
                _percent(overall),
                "-" if versus is None else _difference(overall, baseline.mmlu["all"].get("mmlu")),
                *(_percent(summary.mmlu["category"].get(c)) for c in categories),
                "-" if versus is None else f"{versus['same_prediction']}/{versus['questions']}",
                "-" if versus is None else f"{versus['max_abs_loglikelihood_diff']:.2e}",
                f"{summary.result.perplexity.perplexity:.3f}" if summary.result.perplexity else "-",
                f"{summary.result.seconds_per_question:.3f}",
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append("Accuracy is mean ± standard error over the questions evaluated; Δ in percentage points.")
        lines.append("")

    other = {name: task_metrics(summary.result.lm_eval) for name, summary in ((s.name, s) for s in summaries)}
    tasks = sorted({task for metrics in other.values() for task in metrics})
    if tasks:
        # Without an MMLU table, perplexity and timing go here.
        timing = [] if baseline.mmlu["all"] else ["perplexity", "s/question"]
        header = ["variant", *tasks, *timing]
        lines += ["## Other tasks (acc, %)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for summary in summaries:
            cells = [summary.name]
            for task in tasks:
                value = other[summary.name].get(task)
                cells.append("-" if value is None else _percent(Accuracy(0, value[0], value[1])))
            if timing:
                perplexity = summary.result.perplexity
                cells += [f"{perplexity.perplexity:.3f}" if perplexity else "-", f"{summary.result.seconds_per_question:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(summaries: list[Summary], output_dir: Path) -> Path:
    """Write one row per (subject, variant): questions, accuracy, standard error, difference to the baseline."""
    path = output_dir / CSV_NAME
    baseline = summaries[0].mmlu["subject"]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "category", "variant", "questions", "accuracy", "stderr", "difference_vs_baseline"])
        for subject in sorted(baseline):
            for summary in summaries:
                value = summary.mmlu["subject"].get(subject)
                if value is None:
                    continue
                writer.writerow([subject, SUBJECT_CATEGORIES[subject], summary.name, value.questions,
                                 f"{value.accuracy:.6f}", f"{value.stderr:.6f}",
                                 f"{value.accuracy - baseline[subject].accuracy:.6f}"])
    return path


def write_chart(summaries: list[Summary], output_dir: Path) -> Path:
    """Bars of MMLU accuracy (all and per category) with standard-error whiskers, and perplexity if measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["all"] + [category for category in CATEGORY_TITLES if category in summaries[0].mmlu["category"]]
    has_ppl = any(summary.result.perplexity for summary in summaries)
    figure, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(12 if has_ppl else 9, 4.5),
                                gridspec_kw={"width_ratios": [3, 1]} if has_ppl else None, squeeze=False)
    accuracy_axis = axes[0][0]
    width = 0.8 / len(summaries)
    for index, summary in enumerate(summaries):
        values = [summary.mmlu["all"].get("mmlu") if group == "all" else summary.mmlu["category"].get(group) for group in groups]
        heights = [100 * value.accuracy if value else 0.0 for value in values]
        errors = [100 * value.stderr if value and not math.isnan(value.stderr) else 0.0 for value in values]
        positions = [group_index + (index - (len(summaries) - 1) / 2) * width for group_index in range(len(groups))]
        accuracy_axis.bar(positions, heights, width, yerr=errors, capsize=3, label=summary.name)
    accuracy_axis.axhline(25, color="grey", linestyle="--", linewidth=1, label="chance (25%)")
    accuracy_axis.set_xticks(range(len(groups)), ["MMLU" if g == "all" else CATEGORY_TITLES[g] for g in groups])
    accuracy_axis.set_ylabel("accuracy (%)")
    accuracy_axis.set_title("MMLU accuracy ± standard error")
    # Below the axis, so that it covers no bar
    accuracy_axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(3, len(summaries) + 1))

    if has_ppl:
        ppl_axis = axes[0][1]
        names = [summary.name for summary in summaries]
        values = [summary.result.perplexity.perplexity if summary.result.perplexity else 0.0 for summary in summaries]
        bars = ppl_axis.bar(range(len(names)), values, color=[f"C{index}" for index in range(len(names))])
        ppl_axis.bar_label(bars, fmt="%.3f", fontsize="small")  # the bars of close values look alike
        ppl_axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize="small")
        ppl_axis.set_title("held-out perplexity")

    figure.tight_layout()
    path = output_dir / CHART_NAME
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_reports(results: list[VariantResult], settings: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    """Write every report file; the first result is the baseline. Returns the paths by kind."""
    output_dir = Path(output_dir)
    (output_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    # Samples of an earlier run's variants would sit next to this run's as if they belonged to it
    for stale in (output_dir / SAMPLES_DIR).glob("*.jsonl"):
        stale.unlink()
    summaries = summarise(results)
    table = format_table(summaries, settings)
    (output_dir / TABLE_NAME).write_text(table, encoding="utf-8")
    paths = {"json": write_json(summaries, settings, output_dir), "table": output_dir / TABLE_NAME}
    if summaries[0].mmlu["subject"]:
        paths["csv"] = write_csv(summaries, output_dir)
        paths["chart"] = write_chart(summaries, output_dir)
    return paths
