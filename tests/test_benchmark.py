"""Smoke run of ``upcyclebase bench`` on a tiny Gemma-3, and the pieces it is built from."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_gemma3
from upcyclebase import extra_parameters, upcycle
from upcyclebase.benchmark import LORA_TARGETS, classify_operator, lora_rank_for
from upcyclebase.benchmark_report import TARGETS
from upcyclebase.cli import main


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_quick_writes_record(tmp_path, restore_threads):
    model_dir, output_dir = tmp_path / "model", tmp_path / "bench"
    make_tiny_gemma3().save_pretrained(model_dir)

    status = main(["bench", "--model_id", str(model_dir), "--output_dir", str(output_dir), "--quick", "--threads", "1"])

    assert status == 0
    assert (output_dir / "benchmark.png").stat().st_size > 0
    payload = json.loads((output_dir / "benchmark.json").read_text())
    assert [row["name"] for row in payload["targets"]] == [target.name for target in TARGETS]
    for row in payload["targets"]:
        assert row["ratio"] is not None and row["ratio"] > 0, row
    page = (output_dir / "BENCHMARKS.md").read_text()
    for target in TARGETS:
        assert target.name in page
    assert "upcyclebase bench --model_id" in page
    assert "Load average" in page

    results = payload["results"]
    assert [cell["seq_len"] for cell in results["forward"]] == [32, 64]
    assert len(results["forward"][0]["seconds"]["wall"]["routed"]["values"]) == 2
    assert len(results["forward"][0]["seconds"]["cpu"]["routed"]["values"]) == 2
    assert results["train"]["memory"]["routed"]["peak_bytes"] > results["train"]["memory"]["routed"]["resident_bytes"]
    assert sum(results["profile"]["seconds"]["routed"].values()) > 0


def test_lora_rank_matches_extra_parameters():
    model = make_tiny_gemma3()
    per_rank = sum(
        module.in_features + module.out_features
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in LORA_TARGETS
    )
    target = sum(param.numel() for param in extra_parameters(upcycle(make_tiny_gemma3())).values())

    rank = lora_rank_for(model, target)

    assert abs(rank * per_rank - target) <= per_rank / 2


def test_classify_operator_by_weight_shape():
    config = make_tiny_gemma3().config  # hidden 48, intermediate 96, vocabulary 128, 4 heads
    lora_rank = 5

    assert classify_operator("aten::mm", [[10, 48], [48, 128]], config, lora_rank) == "LM head"
    assert classify_operator("aten::addmm", [[48], [10, 48], [48, 96]], config, lora_rank) == "MLP"
    assert classify_operator("aten::mm", [[10, 48], [48, 8]], config, lora_rank) == "router and routing"
    assert classify_operator("aten::mm", [[10, 48], [48, 5]], config, lora_rank) == "LoRA adapters"
    assert classify_operator("aten::mm", [[10, 48], [48, 16]], config, lora_rank) == "attention projections"
    assert classify_operator("aten::_scaled_dot_product_flash_attention_for_cpu", [], config, lora_rank) == (
        "attention (QK^T, softmax, V)"
    )
    assert classify_operator("aten::index_add_", [], config, lora_rank) == "row gather/scatter"
    assert classify_operator("aten::topk", [], config, lora_rank) == "router and routing"
    assert classify_operator("aten::mul", [], config, lora_rank) == "other"
