"""Every command rejects bad input with one line that names the value, exit status 2 and no traceback.

Each row is one case: the command line, then a fragment the error must contain. Commands
run in-process through ``upcyclebase.cli.main``; a few rows also run as real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from upcyclebase.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad files and folders, made once: data files, upcycled folders with faults."""
    from conftest import make_tiny_gemma3

    from upcyclebase import save_upcycled, upcycle

    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("")
    (root / "short.txt").write_text("Too short for one block.\n")
    (root / "no_field.jsonl").write_text(json.dumps({"body": "Some text " * 50}) + "\n")
    (root / "number_field.jsonl").write_text("\n".join(json.dumps({"text": i}) for i in range(50)) + "\n")
    (root / "busy").mkdir()
    (root / "busy" / "keep.txt").write_text("mine")

    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32).save_pretrained(root / "gpt2")

    tiny = make_tiny_gemma3()
    upcycle(tiny)
    save_upcycled(tiny, root / "other_base", base_model="embedded")  # shapes of a tiny model, not Gemma-3 270M
    for name in ("missing_adapter", "corrupt_adapter", "wrong_types"):
        save_upcycled(tiny, root / name, base_model="embedded")
    (root / "missing_adapter" / "upcycle_adapter.safetensors").unlink()
    (root / "corrupt_adapter" / "upcycle_adapter.safetensors").write_bytes(b"\x00" * 64)
    # shapes of Gemma-3 270M, so that the check reaches the corrupted weights file
    record = json.loads((root / "corrupt_adapter" / "upcycle_config.json").read_text())
    record["shapes"].update(num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1, head_dim=256, hidden_size=640)
    (root / "corrupt_adapter" / "upcycle_config.json").write_text(json.dumps(record))
    record = json.loads((root / "wrong_types" / "upcycle_config.json").read_text())
    record["upcycle"]["top_k"] = "four"
    (root / "wrong_types" / "upcycle_config.json").write_text(json.dumps(record))
    save_upcycled(tiny, root / "list_config", base_model="embedded")
    (root / "list_config" / "upcycle_config.json").write_text("[1, 2]")
    # A Gemma-3 model folder (config only) that an output folder must not replace
    tiny.config.save_pretrained(root / "base_folder")
    return root


# (command line with {root} for the fixture folder, fragment the message must contain)
CASES = [
    ("upcycle --model_id {root}/absent --output_dir {root}/o1", "absent"),
    ("upcycle --model_id nobody/not-a-model --output_dir {root}/o2", "embedded"),
    ("upcycle --model_id embedded --output_dir {root}/busy", "--overwrite_output_dir"),
    ("upcycle --model_id {root}/gpt2 --output_dir {root}/o5", "gpt2"),
    ("train --model_id {root}/gpt2 --output_dir {root}/t15", "supported families"),
    ("upcycle --model_id embedded --dtype float8 --output_dir {root}/o3", "float8"),
    ("upcycle --model_id embedded --router_init random --output_dir {root}/o4", "random"),
    ("train --model_id embedded --top_k 0 --output_dir {root}/t1", "top_k"),
    ("train --model_id embedded --top_k 99 --output_dir {root}/t2", "99"),
    ("train --model_id embedded --seq_len 0 --output_dir {root}/t3", "seq_len"),
    ("train --model_id embedded --seq_len 100000 --output_dir {root}/t4", "100000"),
    ("train --model_id embedded --batch_size 0 --output_dir {root}/t5", "batch_size"),
    ("train --model_id embedded --grad_accum 0 --output_dir {root}/t6", "grad_accum"),
    ("train --model_id embedded --lr -1 --output_dir {root}/t7", "-1"),
    ("train --model_id embedded --max_steps 0 --output_dir {root}/t8", "max_steps"),
    ("train --model_id embedded --dataset {root}/absent.txt --output_dir {root}/t9", "absent.txt"),
    ("train --model_id embedded --dataset {root}/empty.txt --output_dir {root}/t10", "empty"),
    ("train --model_id embedded --dataset {root}/short.txt --seq_len 256 --output_dir {root}/t11", "short.txt"),
    ("train --model_id embedded --dataset {root}/no_field.jsonl --output_dir {root}/t12", "text"),
    ("train --model_id embedded --dataset {root}/number_field.jsonl --output_dir {root}/t13", "text"),
    ("train --model_id embedded --output_dir {root}/busy", "--overwrite_output_dir"),
    ("train --model_id {root}/absent --output_dir {root}/t14", "absent"),
    ("eval --model_id embedded --limit 0 --output_dir {root}/e1", "limit"),
    ("eval --model_id embedded --limit -3 --output_dir {root}/e2", "-3"),
    ("eval --model_id embedded --top_k 0,99 --output_dir {root}/e3", "top_k"),
    ("eval --upcycled {root}/absent --output_dir {root}/e4", "absent"),
    ("eval --upcycled {root}/missing_adapter --output_dir {root}/e5", "upcycle_adapter.safetensors"),
    ("eval --upcycled {root}/corrupt_adapter --output_dir {root}/e6", "safetensors"),
    ("eval --upcycled {root}/wrong_types --output_dir {root}/e7", "four"),
    ("eval --upcycled {root}/other_base --output_dir {root}/e8", "was made for a base model"),
    ("eval --model_id embedded --mmlu_dir {root}/absent_mmlu --output_dir {root}/e9", "absent_mmlu"),
    ("eval --model_id embedded --router_init original,random --output_dir {root}/e10", "random"),
    ("eval --model_id embedded --output_dir {root}/empty.txt", "is a file"),
    ("eval --model_id embedded --output_dir {root}/empty.txt/sub", "cannot be created"),
    ("eval --model_id embedded --tasks mmlu_anatomy,no_such_task --output_dir {root}/e11", "no_such_task"),
    ("eval --model_id embedded --top_k 4,4 --output_dir {root}/e12", "twice"),
    ("eval --model_id embedded --ppl_max_length 1 --output_dir {root}/e13", "ppl_max_length"),
    ("eval --model_id embedded --ppl_max_tokens -5 --output_dir {root}/e14", "ppl_max_tokens"),
    ("eval --model_id embedded --device nonsense --output_dir {root}/e15", "nonsense"),
    ("eval --model_id embedded --device mps --output_dir {root}/e16", "not available"),
    ("eval --upcycled {root}/list_config --output_dir {root}/e17", "not an object"),
    ("train --model_id embedded --device nonsense --output_dir {root}/t16", "nonsense"),
    ("upcycle --model_id embedded --device nonsense --output_dir {root}/o6", "nonsense"),
    ("upcycle --model_id {root}/base_folder --output_dir {root}/base_folder --overwrite_output_dir", "base weights"),
    ("upcycle --model_id {root}/base_folder --output_dir {root} --overwrite_output_dir", "base weights"),
    ("upcycle --model_id embedded --output_dir {root}/empty.txt/sub", "is a file"),
    ("train --model_id embedded --output_dir {root}/empty.txt", "is a file"),
]


def run_cli(command: str, root: Path, capsys) -> tuple[int, str]:
    argv = command.format(root=root).split()
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse rejects a flag's syntax with SystemExit(2)
        code = stop.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("command, fragment", CASES, ids=[c.split(" --")[0] + ":" + c.split("--")[-2].strip() for c, _ in CASES])
def test_bad_input_rejected(command, fragment, inputs, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    code, err = run_cli(command, inputs, capsys)

    assert code == 2, err
    assert fragment in err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    output_dir = Path(command.split("--output_dir ")[1].split()[0].format(root=inputs))
    assert output_dir.name in ("busy", "empty.txt", "base_folder", inputs.name) or not output_dir.exists(), f"{output_dir} was created"


def test_busy_output_left_alone(inputs):
    assert (inputs / "busy" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (inputs / "busy").iterdir()) == ["keep.txt"]


def test_base_folder_left_alone(inputs):
    assert sorted(p.name for p in (inputs / "base_folder").iterdir()) == ["config.json"]


@pytest.mark.parametrize("script, flags", [
    ("train_upcycled.py", ["--model_id", "embedded", "--top_k", "0"]),
    ("eval_mmlu.py", ["--model_id", "embedded", "--limit", "0"]),
])
def test_scripts_exit_two(script, flags, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / script), *flags, "--output_dir", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
