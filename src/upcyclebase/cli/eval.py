"""``upcyclebase eval``: MMLU and perplexity of the stock model and upcycled variants, in one run."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..checkpoint import SELF_BASE, load_upcycled, read_upcycled_config
from ..config import ROUTER_INITS
from ..evaluation import EvalPlan, Variant, build_task_list, evaluate_variants, normalise_limit, resolve_mmlu_source
from ..models import DEFAULT_MODEL_ID, load_base_model, resolve_device_dtype, resolve_model_path
from ..perplexity import DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS, default_perplexity_file, read_texts
from ..preflight import check_output_folder
from ..reports import write_reports
from ..upcycle import moh_modules, upcycle
from .args import UsageError, add_dataclass_arguments, dataclass_from_args

logger = logging.getLogger(__name__)

BASELINES = ("shortcut", "separate")


@dataclass
class EvalArgs:
    model_id: str | None = field(default=None, metadata={"help": (
        f"Base model: Hub id, local folder, or 'embedded' for the packaged Gemma-3 270M (default: {DEFAULT_MODEL_ID}; "
        "with --upcycled, the base recorded in that folder; a full-copy folder keeps its own base and this names the stock baseline).")})
    upcycled: str | None = field(default=None, metadata={"help": (
        "An upcycled folder (from upcycle or training) to evaluate; by default the base model is upcycled afresh.")})
    router_init: str = field(default="original", metadata={"help": (
        "Router init of a fresh upcycle, or a comma-separated list to evaluate each, e.g. original,interleaved.")})
    top_k: str | None = field(default=None, metadata={"help": (
        "Comma-separated heads per token (of 2H) to evaluate the upcycled model at, e.g. 2,4,6 "
        "(default: H for a fresh upcycle, the saved top_k for --upcycled).")})
    with_init: bool = field(default=False, metadata={"help": (
        "With --upcycled, also evaluate a fresh upcycle of the base at the same top_k values (loads a second copy).")})
    baseline: str = field(default="shortcut", metadata={"help": (
        "Baseline: 'shortcut' is the upcycled object with the identity shortcut on (one model in memory), "
        "'separate' loads the stock model again. Full-copy folders use 'separate', since their base weights may be trained."),
        "choices": BASELINES})
    tasks: str = field(default="mmlu", metadata={"help": "Comma-separated lm-eval tasks or groups, e.g. mmlu or mmlu_anatomy,mmlu_astronomy."})
    mmlu_dir: str | None = field(default=None, metadata={"help": (
        "MMLU source: a local cais/mmlu copy (see prepare-mmlu) or a Hub id such as cais/mmlu "
        "(default: the prepared local copy if present, prepared now when offline, else cais/mmlu).")})
    num_fewshot: int = field(default=0, metadata={"help": "Few-shot examples per question; needs a dev split."})
    limit: float | None = field(default=None, metadata={"help": (
        "Questions per task (per MMLU subject), or a fraction below 1; omit to run everything (14,042 MMLU questions).")})
    batch_size: str = field(default="1", metadata={"help": "lm-eval batch size: a number, or 'auto' to find the largest that fits."})
    ppl_file: str | None = field(default=None, metadata={"help": (
        f"Held-out text for perplexity, .jsonl (field 'text') or .txt (default: {default_perplexity_file()}, skipped if missing).")})
    ppl_max_tokens: int = field(default=DEFAULT_MAX_TOKENS, metadata={"help": "Tokens scored for perplexity; 0 skips perplexity."})
    ppl_max_length: int = field(default=DEFAULT_MAX_LENGTH, metadata={"help": "Perplexity window in tokens."})
    output_dir: str = field(default="./eval_results", metadata={"help": "Folder for results.json, results.md, the CSV and the chart."})
    device: str | None = field(default=None, metadata={"help": "cuda, mps or cpu (default: the best available)."})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default: bf16 on CUDA, fp16 on MPS, fp32 on CPU)."})
    seed: int = field(default=1234, metadata={"help": "Seed for lm-eval's sampling and few-shot example choice."})


def parse_top_k(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    values = []
    for part in text.split(","):
        try:
            values.append(int(part))
        except ValueError:
            raise UsageError(f"--top_k {text!r} is invalid; use comma-separated integers such as 2,4,6.") from None
    if len(set(values)) != len(values):
        raise UsageError(f"--top_k {text!r} lists a value twice; name each top_k once.")
    return values


def parse_router_inits(text: str) -> list[str]:
    inits = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [init for init in inits if init not in ROUTER_INITS]
    if not inits or unknown:
        raise UsageError(f"--router_init {text!r} is invalid; use one or more of {', '.join(ROUTER_INITS)}, comma-separated.")
    return list(dict.fromkeys(inits))


def _parse_batch_size(text: str) -> int | str:
    if text.startswith("auto"):
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise UsageError(f"--batch_size {text!r} is invalid; use a positive integer or 'auto'.")


def _perplexity_texts(options: EvalArgs) -> list[str] | None:
    if options.ppl_max_tokens < 0:
        raise UsageError(f"--ppl_max_tokens {options.ppl_max_tokens} is invalid; use a token count, or 0 to skip perplexity.")
    if options.ppl_max_length < 2:
        raise UsageError(f"--ppl_max_length {options.ppl_max_length} is invalid; a perplexity window needs 2 or more tokens.")
    if options.ppl_max_tokens == 0:
        return None
    if options.ppl_file:
        return read_texts(options.ppl_file)
    default = default_perplexity_file()
    if not default.is_file():
        logger.warning("No perplexity file at %s, so perplexity is skipped; prepare the corpus or pass --ppl_file", default)
        return None
    return read_texts(default)


def _check_tasks(task_list: list, task_manager) -> None:
    """Reject task names that lm-eval does not know, before any model loads."""
    known = set(task_manager.all_tasks)
    unknown = [task for task in task_list if isinstance(task, str) and task not in known]
    if unknown:
        raise UsageError(
            f"--tasks names {', '.join(map(repr, unknown))}, which lm-eval does not know; "
            "run `lm-eval ls tasks` for the names, or use mmlu, an MMLU category or mmlu_<subject>."
        )


def _make_output_dir(path: Path) -> Path | None:
    """Create ``path`` and return the topmost folder this created (None if it existed), so a failed run can remove it.

    Call ``check_output_folder`` first: it rejects a file and an unwritable parent with a clearer message.
    """
    created = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        created = folder
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"--output_dir {str(path)!r} cannot be created ({error.strerror}); name a folder you can write to.") from None
    return created


def _remove_empty_folders(path: Path, top: Path | None) -> None:
    """Remove ``path`` and its parents up to ``top`` while they are empty (what _make_output_dir created)."""
    if top is None:
        return
    for folder in (path, *path.parents):
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == top:
            return


def _check_top_k(model, values: list[int]) -> None:
    for value in values:
        next(moh_modules(model)).check_top_k(value)


def _fresh_variants(model, router_inits: list[str], values: list[int], source: str) -> list[Variant]:
    """List one variant per router init and top_k of a fresh upcycle; each resets the routers of ``model``."""
    return [
        Variant(f"upcycled init ({init}) top_k={k}", "init", model, top_k=k, source=source, router_init=init)
        for init in router_inits
        for k in values
    ]


def build_variants(options: EvalArgs, top_k: list[int] | None):
    """Load the models and list the variants, baseline first. Returns (variants, tokenizer, base model id)."""
    from transformers import AutoTokenizer

    router_inits = parse_router_inits(options.router_init)
    full_copy = False
    if options.upcycled is None:
        base_id = options.model_id or DEFAULT_MODEL_ID
        model, tokenizer = load_base_model(base_id, options.device, options.dtype)
        upcycle(model, router_init=router_inits[0])
        values = top_k or [next(moh_modules(model)).moh_num_heads // 2]
        _check_top_k(model, values)
    else:
        record = read_upcycled_config(options.upcycled)
        full_copy = record["base_model"] == SELF_BASE
        base_id = options.model_id or record["source_model"]
        # A full copy brings its own (possibly trained) base; --model_id then names only the stock baseline.
        model = load_upcycled(options.upcycled, None if full_copy else options.model_id, device=options.device, dtype=options.dtype)
        tokenizer_source = options.upcycled if (Path(options.upcycled) / "tokenizer_config.json").is_file() else resolve_model_path(base_id)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        values = top_k or [next(moh_modules(model)).moh_top_k]
        _check_top_k(model, values)

    baseline_mode = "separate" if full_copy else options.baseline
    if baseline_mode == "separate":
        stock, _ = load_base_model(base_id, options.device, options.dtype)
        variants = [Variant("baseline (stock, separate)", "baseline", stock, source=base_id)]
    else:
        variants = [Variant("baseline (stock)", "baseline", model, identity_shortcut=True, source=base_id)]

    if options.upcycled is None:
        return variants + _fresh_variants(model, router_inits, values, base_id), tokenizer, base_id
    if options.with_init:
        fresh, _ = load_base_model(base_id, options.device, options.dtype)
        upcycle(fresh, router_init=router_inits[0])
        variants += _fresh_variants(fresh, router_inits, values, base_id)
    label = f"upcycled {Path(options.upcycled).name}"
    variants += [Variant(f"{label} top_k={k}", "trained", model, top_k=k, source=options.upcycled) for k in values]
    return variants, tokenizer, base_id


def run(args: argparse.Namespace) -> int:
    options = dataclass_from_args(EvalArgs, args)
    if options.with_init and options.upcycled is None:
        raise UsageError("--with_init needs --upcycled; a run without it already evaluates the fresh upcycle.")
    if options.num_fewshot < 0:
        raise UsageError(f"--num_fewshot {options.num_fewshot} is invalid; use 0 or more.")
    top_k = parse_top_k(options.top_k)
    parse_router_inits(options.router_init)
    tasks = [name.strip() for name in options.tasks.split(",") if name.strip()]
    if not tasks:
        raise UsageError("--tasks is empty; name at least one lm-eval task, e.g. mmlu.")

    # Everything that can fail on user input is checked before the models load.
    mmlu_source = resolve_mmlu_source(options.mmlu_dir)
    plan = EvalPlan(
        task_list=build_task_list(tasks, mmlu_source, options.num_fewshot),
        limit=normalise_limit(options.limit),
        num_fewshot=options.num_fewshot,
        batch_size=_parse_batch_size(options.batch_size),
        perplexity_texts=_perplexity_texts(options),
        perplexity_max_length=options.ppl_max_length,
        perplexity_max_tokens=options.ppl_max_tokens,
        seed=options.seed,
    )
    check_output_folder(options.output_dir)
    device, dtype = resolve_device_dtype(options.device, options.dtype)
    if not args.debug:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager()
    _check_tasks(plan.task_list, task_manager)

    # Created before the models load, so that a folder that cannot be made fails early; removed if the run fails
    output_dir = Path(options.output_dir)
    created = _make_output_dir(output_dir)
    start = time.perf_counter()
    try:
        variants, tokenizer, base_id = build_variants(options, top_k)
        results = evaluate_variants(variants, tokenizer, plan, task_manager=task_manager)
    except BaseException:
        _remove_empty_folders(output_dir, created)
        raise

    import lm_eval

    settings = {
        **asdict(options),
        "model_id": base_id,
        "limit": plan.limit,
        "mmlu_source": mmlu_source,
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "lm_eval_version": lm_eval.__version__,
        "perplexity_file": str(options.ppl_file or default_perplexity_file()) if plan.perplexity_texts else None,
        "wall_seconds": time.perf_counter() - start,
    }
    paths = write_reports(results, settings, output_dir)
    print((output_dir / "results.md").read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def register(subparsers) -> None:
    from . import add_command

    parser = add_command(subparsers, "eval", "Compare the stock and upcycled model on MMLU (lm-eval) and held-out perplexity.", run)
    add_dataclass_arguments(parser, EvalArgs)
