"""Evaluation through lm-eval on the real Gemma-3 270M, checked question by question.

The references are lm-eval's own loading of the stock model (``HFLM(pretrained=path)``), the
stock model's forward pass and transformers' own loss, never the evaluation code itself.
Each run uses two MMLU subjects with short questions (humanities and "other") and two
questions per subject, to keep the runs short on a CPU.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from upcyclebase import save_upcycled, set_moh, upcycle
from upcyclebase.checkpoint import load_upcycled
from upcyclebase.cli import main
from upcyclebase.evaluation import (
    EvalPlan,
    NonFiniteScoresError,
    Variant,
    VariantResult,
    _check_finite,
    build_task_list,
    evaluate_variants,
    normalise_limit,
    question_scores,
    run_lm_eval,
)
from upcyclebase.mmlu import packaged_mmlu_file, read_packaged_mmlu, write_cais_layout
from upcyclebase.perplexity import compute_perplexity
from upcyclebase.reports import CHART_NAME, CSV_NAME, JSON_NAME, SAMPLES_DIR, TABLE_NAME

SUBJECTS = ("world_religions", "virology")
TASKS = [f"mmlu_{subject}" for subject in SUBJECTS]
LIMIT = 2
HEADS = 4  # query heads of Gemma-3 270M
LOGLIK_TOLERANCE = 1e-4  # float32; for a routed model scored here by one forward, against lm-eval's batch


@pytest.fixture(scope="module")
def mmlu_dir(tmp_path_factory):
    """A cais/mmlu copy with two subjects of the packaged test set."""
    by_subject = read_packaged_mmlu(packaged_mmlu_file())
    folder = tmp_path_factory.mktemp("mmlu") / "mmlu"
    write_cais_layout({subject: by_subject[subject] for subject in SUBJECTS}, folder)
    return folder


@pytest.fixture(scope="module")
def plan(mmlu_dir):
    return EvalPlan(task_list=build_task_list(TASKS, str(mmlu_dir), num_fewshot=0), limit=LIMIT)


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _record_routing(model):
    from upcyclebase import moh_modules

    modules = list(moh_modules(model))
    for module in modules:
        module.moh_record_routing = True
    return modules


def _assert_same_scores(found, expected):
    assert sorted(found) == sorted(expected)
    assert len(expected) == LIMIT * len(SUBJECTS)
    for key, score in expected.items():
        assert found[key].prediction == score.prediction, key
        assert found[key].correct == score.correct, key
        assert found[key].loglikelihoods == score.loglikelihoods, key  # bitwise: same answers is not enough


@pytest.fixture(scope="module")
def fresh_runs(gemma270m_path, gemma270m_tokenizer, plan, task_manager):
    """Baseline (identity shortcut) and routed top_k=H of a fresh upcycle, per router init."""
    runs = {}
    for router_init in ("original", "interleaved"):
        model = upcycle(_load(gemma270m_path), router_init=router_init)
        modules = _record_routing(model)
        variants = [Variant(f"routed {router_init}", "init", model, top_k=HEADS)]
        if router_init == "original":
            variants.insert(0, Variant("baseline", "baseline", model, identity_shortcut=True))
        for variant, result in zip(variants, evaluate_variants(variants, gemma270m_tokenizer, plan, task_manager=task_manager)):
            runs[variant.name] = question_scores(result.lm_eval)
        runs[f"routing {router_init}"] = modules[0].moh_last_routing
    return runs


@pytest.mark.integration
def test_baseline_matches_lm_eval_loading(fresh_runs, gemma270m_path, plan, task_manager):
    from lm_eval.models.huggingface import HFLM

    reference = HFLM(pretrained=gemma270m_path, device="cpu", dtype="float32", batch_size=1)
    expected = question_scores(run_lm_eval(reference, plan, task_manager))

    _assert_same_scores(fresh_runs["baseline"], expected)


@pytest.mark.integration
@pytest.mark.parametrize("router_init", ["original", "interleaved"])
def test_fresh_upcycle_scores_baseline(fresh_runs, router_init):
    routing = fresh_runs[f"routing {router_init}"]

    # The routed path ran, with H of 2H heads per token; interleaved init picks extra-bank heads.
    assert routing is not None
    assert torch.all(routing.mask.sum(-1) == HEADS)
    assert bool(routing.mask[..., HEADS:].any()) == (router_init == "interleaved")
    _assert_same_scores(fresh_runs[f"routed {router_init}"], fresh_runs["baseline"])


@pytest.fixture(scope="module")
def trained_folder(gemma270m_path, gemma270m_tokenizer, tmp_path_factory):
    """An upcycled folder whose extra banks and routers were changed, as training would."""
    model = upcycle(_load(gemma270m_path))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "_extra" in name or "moh_router" in name:
                param.add_(torch.randn(param.shape, generator=generator) * param.detach().std().clamp_min(0.05))
    set_moh(model, identity_shortcut=False)
    folder = tmp_path_factory.mktemp("trained") / "trained-heads"
    return save_upcycled(model, folder, gemma270m_tokenizer, base_model=gemma270m_path)


@pytest.fixture(scope="module")
def trained_report(trained_folder, gemma270m_path, mmlu_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("eval")
    ppl_file = output / "heldout.jsonl"
    ppl_file.write_text(json.dumps({"text": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France."}) + "\n")
    status = main([
        "eval", "--upcycled", str(trained_folder), "--tasks", ",".join(TASKS), "--limit", str(LIMIT),
        "--mmlu_dir", str(mmlu_dir), "--ppl_file", str(ppl_file), "--output_dir", str(output / "report"),
    ])
    assert status == 0
    return output / "report"


def _report_scores(report, variant):
    scores = {}
    samples = report / variant["samples_file"]
    for line in samples.read_text().splitlines():
        sample = json.loads(line)
        scores[(sample["task"], sample["doc_id"])] = sample
    return scores


@pytest.mark.integration
def test_trained_row_next_to_baseline(trained_report, trained_folder):
    table = (trained_report / TABLE_NAME).read_text()
    results = json.loads((trained_report / JSON_NAME).read_text())

    names = [variant["name"] for variant in results["variants"]]
    assert names == ["baseline (stock)", f"upcycled {trained_folder.name} top_k={HEADS}"]
    for name in names:
        assert f"| {name} | {LIMIT * len(SUBJECTS)} |" in table
    assert results["variants"][1]["versus_baseline"]["max_abs_loglikelihood_diff"] > 1e-2
    assert all(variant["perplexity"]["perplexity"] > 1 for variant in results["variants"])
    assert (trained_report / CHART_NAME).read_bytes().startswith(b"\x89PNG")


@pytest.mark.integration
def test_trained_logliks_match_forward(trained_report, trained_folder, gemma270m_path, gemma270m_tokenizer):
    results = json.loads((trained_report / JSON_NAME).read_text())
    model = load_upcycled(trained_folder, gemma270m_path, device="cpu", dtype="float32")
    set_moh(model, identity_shortcut=False, top_k=HEADS)

    samples = _report_scores(trained_report, results["variants"][1])
    for task in TASKS:
        sample = samples[(task, 0)]
        (context, _), *_ = sample["arguments"]
        context_ids = gemma270m_tokenizer(context).input_ids
        with torch.no_grad():
            logprobs = model(torch.tensor([context_ids])).logits[0, -1].float().log_softmax(-1)
        for (_, continuation), response in zip(sample["arguments"], sample["filtered_resps"]):
            # lm-eval scores the continuation tokens of the tokenized context + continuation;
            # MMLU's " A" .. " D" are one token each, so one forward of the context scores all four.
            whole = gemma270m_tokenizer(context + continuation).input_ids
            assert whole[:-1] == context_ids
            expected = logprobs[whole[-1]].item()
            assert float(response[0]) == pytest.approx(expected, abs=LOGLIK_TOLERANCE, rel=0), (task, continuation)


@pytest.mark.integration
def test_report_numbers_match_lm_eval(trained_report):
    results = json.loads((trained_report / JSON_NAME).read_text())
    with (trained_report / CSV_NAME).open() as handle:
        rows = list(csv.DictReader(handle))

    assert len(rows) == len(SUBJECTS) * len(results["variants"])
    for row in rows:
        variant = next(v for v in results["variants"] if v["name"] == row["variant"])
        task_results = variant["lm_eval"]["results"][f"mmlu_{row['subject']}"]
        assert float(row["accuracy"]) == pytest.approx(task_results["acc,none"], abs=1e-6)
        assert float(row["stderr"]) == pytest.approx(task_results["acc_stderr,none"], abs=1e-6)
    for variant in results["variants"]:
        group = variant["lm_eval"]["results"]["mmlu_local::mmlu_local_subjects"]
        assert variant["mmlu"]["all"]["mmlu"]["accuracy"] == pytest.approx(group["acc,none"], abs=1e-9)
        assert (trained_report / SAMPLES_DIR).is_dir()


class _ByteTokenizer:
    """Bytes as token ids below the tiny model's vocabulary, with a BOS of 1."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([[1, *(3 + byte % 120 for byte in text.encode())]])
        return type("Encoding", (), {"input_ids": ids})()


@pytest.mark.parametrize("max_length", [64, 16])
def test_perplexity_matches_model_loss(tiny_model, max_length):
    texts = ["a quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs"]
    tokenizer = _ByteTokenizer()

    result = compute_perplexity(tiny_model, tokenizer, texts, max_length=max_length, max_tokens=None)

    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text).input_ids
        for begin in range(0, ids.shape[1] - 1, max_length):
            window = ids[:, begin:begin + max_length]
            with torch.no_grad():
                loss = tiny_model(window, labels=window).loss.item()
            total += loss * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert result.tokens == count
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.integration
def test_variants_with_init_and_separate_baseline(trained_folder, gemma270m_path):
    from upcyclebase import extra_parameters, moh_modules
    from upcyclebase.cli.eval import EvalArgs, build_variants

    options = EvalArgs(model_id=gemma270m_path, upcycled=str(trained_folder), top_k="2,4", with_init=True,
                       baseline="separate", device="cpu", dtype="float32")

    variants, _, base_id = build_variants(options, [2, HEADS])

    assert base_id == gemma270m_path
    assert [(v.kind, v.top_k) for v in variants] == [("baseline", None), ("init", 2), ("init", HEADS), ("trained", 2), ("trained", HEADS)]
    stock, fresh, trained = variants[0].model, variants[1].model, variants[3].model
    assert len({id(stock), id(fresh), id(trained)}) == 3
    assert list(moh_modules(stock)) == []
    fresh_module, trained_module = next(moh_modules(fresh)), next(moh_modules(trained))
    assert torch.equal(fresh_module.q_proj_extra.weight, fresh_module.q_proj.weight)
    assert not torch.equal(trained_module.q_proj_extra.weight, trained_module.q_proj.weight)
    assert set(extra_parameters(fresh)) == set(extra_parameters(trained))


def test_table_lists_non_mmlu_tasks(tmp_path):
    from upcyclebase.evaluation import VariantResult
    from upcyclebase.reports import write_reports

    def result(name, accuracy):
        output = {"results": {"arc_easy": {"acc,none": accuracy, "acc_stderr,none": 0.1}}, "samples": {}}
        return VariantResult(Variant(name, "init", model=None), output, seconds=8.0, questions=4)

    paths = write_reports([result("baseline", 0.5), result("top_k=2", 0.25)], {"model_id": "m"}, tmp_path)

    table = paths["table"].read_text()
    assert "| baseline | 50.0 ± 10.0 | - | 2.000 |" in table
    assert "| top_k=2 | 25.0 ± 10.0 | - | 2.000 |" in table
    assert "## MMLU" not in table
    assert "csv" not in paths


@pytest.mark.parametrize("limit, expected", [(None, None), (5.0, 5), (0.25, 0.25)])
def test_limit_normalised(limit, expected):
    assert normalise_limit(limit) == expected
    assert type(normalise_limit(limit)) is type(expected)


@pytest.mark.parametrize("limit", [0, -3, 2.5])
def test_invalid_limit_rejected(limit):
    with pytest.raises(ValueError, match="--limit"):
        normalise_limit(limit)


@pytest.mark.parametrize("value, rejected", [(-1.25, False), (float("nan"), True), (float("-inf"), True)])
def test_non_finite_loglikelihood_rejected(tiny_model, value, rejected):
    # argmax over NaN log-likelihoods picks choice 0, so accuracy alone would look plausible
    sample = {"doc_id": 0, "target": 0, "acc": 1.0, "filtered_resps": [[value, False], [-2.5, False]]}
    result = VariantResult(Variant("fp16", "init", tiny_model), {"samples": {"mmlu_anatomy": [sample]}}, 1.0, 1)

    if rejected:
        with pytest.raises(NonFiniteScoresError, match="--dtype float32"):
            _check_finite(result)
    else:
        _check_finite(result)
