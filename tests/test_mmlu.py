"""The local MMLU copy: conversion of the packaged test set, its layout, and few-shot rejection."""

from __future__ import annotations

import json

import pytest

from upcyclebase.cli import main
from upcyclebase.evaluation import FewShotUnavailableError, HUB_MMLU, LOCAL_GROUP, build_task_list
from upcyclebase.mmlu import (
    SUBJECT_CATEGORIES,
    has_split,
    local_subjects,
    packaged_mmlu_file,
    prepare_mmlu,
    read_packaged_mmlu,
)

# Official MMLU test-set sizes of a few subjects (Hendrycks et al., cais/mmlu on the Hub)
OFFICIAL_SIZES = {"abstract_algebra": 100, "anatomy": 135, "high_school_biology": 310, "professional_law": 1534, "world_religions": 171}


def _row(question="What is 2 + 2?", topic="elementary mathematics", answer="B"):
    return {"question": question, "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
            "correct_answer": answer, "topic": topic}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def mmlu_copy(tmp_path_factory):
    """The full packaged test set converted to the cais/mmlu layout."""
    return prepare_mmlu(tmp_path_factory.mktemp("mmlu") / "mmlu")


def test_packaged_file_has_all_questions():
    by_subject = read_packaged_mmlu(packaged_mmlu_file())

    assert set(by_subject) == set(SUBJECT_CATEGORIES)
    assert sum(len(rows) for rows in by_subject.values()) == 14_042
    for subject, size in OFFICIAL_SIZES.items():
        assert len(by_subject[subject]) == size, subject
    questions = [row["question"] for rows in by_subject.values() for row in rows]
    assert "question" not in questions  # the stray CSV header rows are gone


def test_header_rows_dropped(tmp_path):
    header = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
              "answer_d": "answer_d", "correct_answer": "answer", "topic": "elementary mathematics"}
    source = _write_jsonl(tmp_path / "mmlu.jsonl", [_row(), header, _row("What is 3 + 1?", answer="B")])

    by_subject = read_packaged_mmlu(source)

    assert [row["question"] for row in by_subject["elementary_mathematics"]] == ["What is 2 + 2?", "What is 3 + 1?"]
    assert by_subject["elementary_mathematics"][0]["choices"] == ["3", "4", "5", "22"]
    assert by_subject["elementary_mathematics"][0]["answer"] == 1


@pytest.mark.parametrize("row, message", [
    (_row(answer="E"), "not one of A-D"),
    (_row(topic="alchemy"), "unknown subject"),
])
def test_invalid_rows_rejected(tmp_path, row, message):
    source = _write_jsonl(tmp_path / "mmlu.jsonl", [_row(), row])

    with pytest.raises(ValueError, match=message):
        read_packaged_mmlu(source)


def test_copy_loads_with_datasets(mmlu_copy):
    import datasets

    anatomy = datasets.load_dataset(str(mmlu_copy), "anatomy")

    assert list(anatomy) == ["test"]
    assert anatomy["test"].num_rows == 135
    assert set(anatomy["test"].column_names) == {"question", "subject", "choices", "answer"}
    assert all(len(choices) == 4 for choices in anatomy["test"]["choices"])
    assert set(anatomy["test"]["answer"]) <= {0, 1, 2, 3}
    assert local_subjects(mmlu_copy) == sorted(SUBJECT_CATEGORIES)
    assert not has_split(mmlu_copy, "dev")


def test_prepare_leaves_no_staging(mmlu_copy):
    leftovers = [path.name for path in mmlu_copy.parent.iterdir() if path.name != mmlu_copy.name]
    assert leftovers == []


def test_prepare_command_writes_copy(tmp_path, capsys):
    source = _write_jsonl(tmp_path / "mmlu.jsonl", [_row(), _row("Which is prime?", topic="abstract algebra", answer="C")])
    folder = tmp_path / "copy"

    assert main(["prepare-mmlu", "--folder", str(folder), "--source", str(source)]) == 0

    assert local_subjects(folder) == ["abstract_algebra", "elementary_mathematics"]
    assert "2 subjects" in capsys.readouterr().out


def test_task_list_points_at_copy(mmlu_copy):
    specs = build_task_list(["mmlu_stem", "mmlu_anatomy", "arc_easy"], str(mmlu_copy), num_fewshot=0)

    wrapper, plain = specs
    assert plain == "arc_easy"
    assert wrapper["group"] == LOCAL_GROUP
    subjects = [task["task"] for task in wrapper["task"][0]["task"]]
    assert subjects == [f"mmlu_{s}" for s, category in SUBJECT_CATEGORIES.items() if category == "stem"]
    assert all(task["dataset_path"] == str(mmlu_copy) for task in wrapper["task"][0]["task"])
    assert all(task["fewshot_split"] == "test" for task in wrapper["task"][0]["task"])


def test_hub_task_list_unchanged():
    assert build_task_list(["mmlu"], HUB_MMLU, num_fewshot=5) == ["mmlu"]


def test_fewshot_without_dev_rejected(mmlu_copy):
    with pytest.raises(FewShotUnavailableError, match="dev split"):
        build_task_list(["mmlu"], str(mmlu_copy), num_fewshot=5)


def test_fewshot_command_error_is_one_line(mmlu_copy, capsys):
    # Rejected before any model loads, so the unreachable default model id does not matter.
    status = main(["eval", "--mmlu_dir", str(mmlu_copy), "--num_fewshot", "5", "--output_dir", str(mmlu_copy.parent / "out")])

    error = capsys.readouterr().err.strip()
    assert status == 2
    assert len(error.splitlines()) == 1
    assert "--num_fewshot 5" in error
    assert "dev split" in error
