"""Model loading, device and dtype selection, and the upcycle command's input checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from upcyclebase.models import ModelNotFoundError, load_base_model, resolve_device_dtype

REPO = Path(__file__).resolve().parents[1]


def test_cpu_defaults_to_float32():
    assert resolve_device_dtype("cpu") == ("cpu", torch.float32)


def test_mps_bfloat16_falls_back_to_float16(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # as on a Mac

    assert resolve_device_dtype("mps", "bfloat16") == ("mps", torch.float16)


def test_unavailable_device_rejected(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    for device in ("mps", "cuda", "cuda:1"):
        with pytest.raises(ValueError, match="not available"):
            resolve_device_dtype(device)
    with pytest.raises(ValueError, match="invalid"):
        resolve_device_dtype("gpu0")


def test_explicit_dtype_kept():
    assert resolve_device_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)


def test_unknown_dtype_rejected():
    with pytest.raises(ValueError, match="dtype='float8' is invalid"):
        resolve_device_dtype("cpu", "float8")


def test_missing_folder_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_base_model(str(tmp_path / "absent"))


def test_unreachable_hub_names_embedded_default(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(ModelNotFoundError) as raised:
        load_base_model("google/gemma-3-1b-it")

    assert "google/gemma-3-1b-it" in str(raised.value)
    assert "embedded" in str(raised.value)


def _upcycle_command(*flags: str):
    return subprocess.run([sys.executable, str(REPO / "upcycle_heads.py"), *flags], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_command_reports_missing_model(tmp_path):
    result = _upcycle_command("--model_id", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "out"))

    assert result.returncode == 2
    assert "absent" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_command_rejects_non_empty_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    result = _upcycle_command("--model_id", "embedded", "--output_dir", str(tmp_path / "out"))

    assert result.returncode == 2
    assert "--overwrite_output_dir" in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_command_rejects_unknown_router_init(tmp_path):
    result = _upcycle_command("--router_init", "random", "--output_dir", str(tmp_path / "out"))

    assert result.returncode == 2
    assert "random" in result.stderr
