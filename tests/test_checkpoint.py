"""Save and load round trips of upcycled models: adapter folders and full copies."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_gemma3
from test_attention import _perturb_extras, _randomise_routers

from upcyclebase import load_upcycled, moh_modules, save_upcycled, set_moh, upcycle
from upcyclebase.config import ADAPTER_NAME, CONFIG_NAME


@pytest.fixture
def base_dir(tmp_path):
    """A stock tiny model saved as a Hugging Face folder, the base that adapters refer to."""
    folder = tmp_path / "base"
    make_tiny_gemma3().save_pretrained(folder)
    return folder


def _upcycled_from(base_dir, gate_mode="hard"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    upcycle(model, router_init="interleaved", gate_mode=gate_mode)
    _perturb_extras(model)
    _randomise_routers(model)
    set_moh(model, identity_shortcut=False, top_k=3)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("gate_mode", ["hard", "renorm"])
def test_adapter_round_trip_bitwise(base_dir, tmp_path, tiny_ids, gate_mode):
    model = _upcycled_from(base_dir, gate_mode)
    save_upcycled(model, tmp_path / "adapter", base_model=str(base_dir))

    reloaded = load_upcycled(tmp_path / "adapter")

    assert torch.equal(_logits(reloaded, tiny_ids), _logits(model, tiny_ids))
    assert all(m.moh_top_k == 3 and m.moh_routed and m.moh_gate_mode == gate_mode for m in moh_modules(reloaded))


def test_adapter_holds_only_new_weights(base_dir, tmp_path):
    from safetensors import safe_open

    save_upcycled(_upcycled_from(base_dir), tmp_path / "adapter", base_model=str(base_dir))

    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == [ADAPTER_NAME, CONFIG_NAME]
    with safe_open(tmp_path / "adapter" / ADAPTER_NAME, framework="pt") as handle:
        names = list(handle.keys())
    assert len(names) == 8
    assert all("_extra" in name or "moh_router" in name for name in names)


def test_config_records_routing_state(base_dir, tmp_path):
    save_upcycled(_upcycled_from(base_dir), tmp_path / "adapter", base_model=str(base_dir))

    record = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())

    assert record["base_model"] == str(base_dir)
    assert record["upcycle"]["top_k"] == 3
    assert record["upcycle"]["identity_shortcut"] is False
    assert record["shapes"]["num_attention_heads"] == 4


def test_full_copy_round_trip_bitwise(base_dir, tmp_path, tiny_ids):
    model = _upcycled_from(base_dir)
    save_upcycled(model, tmp_path / "full", full_copy=True)

    reloaded = load_upcycled(tmp_path / "full")

    assert torch.equal(_logits(reloaded, tiny_ids), _logits(model, tiny_ids))
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in (tmp_path / "full").iterdir())


def test_full_copy_loads_as_stock_model(base_dir, tmp_path, tiny_ids):
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    save_upcycled(_upcycled_from(base_dir), tmp_path / "full", full_copy=True)

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()

    assert torch.equal(_logits(plain, tiny_ids), _logits(stock, tiny_ids))
    assert not list(moh_modules(plain))


def test_load_onto_given_base_object(base_dir, tmp_path, tiny_ids):
    from transformers import AutoModelForCausalLM

    model = _upcycled_from(base_dir)
    save_upcycled(model, tmp_path / "adapter", base_model="somewhere/else")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    reloaded = load_upcycled(tmp_path / "adapter", base_model=base)

    assert reloaded is base
    assert torch.equal(_logits(reloaded, tiny_ids), _logits(model, tiny_ids))


def test_load_with_base_path_argument(base_dir, tmp_path, tiny_ids):
    model = _upcycled_from(base_dir)
    save_upcycled(model, tmp_path / "adapter", base_model="somewhere/else")

    reloaded = load_upcycled(tmp_path / "adapter", base_model=str(base_dir))

    assert torch.equal(_logits(reloaded, tiny_ids), _logits(model, tiny_ids))


def test_adapter_for_other_base_rejected(base_dir, tmp_path):
    save_upcycled(_upcycled_from(base_dir), tmp_path / "adapter", base_model=str(base_dir))
    other = make_tiny_gemma3(num_kv_heads=1, num_attention_heads=2)

    with pytest.raises(ValueError, match="num_attention_heads=4"):
        load_upcycled(tmp_path / "adapter", base_model=other)
    assert not list(moh_modules(other))


@pytest.mark.parametrize("missing", [ADAPTER_NAME, CONFIG_NAME])
def test_missing_file_rejected(base_dir, tmp_path, missing):
    save_upcycled(_upcycled_from(base_dir), tmp_path / "adapter", base_model=str(base_dir))
    (tmp_path / "adapter" / missing).unlink()

    with pytest.raises(FileNotFoundError, match=missing):
        load_upcycled(tmp_path / "adapter")


def test_corrupted_adapter_rejected(base_dir, tmp_path):
    save_upcycled(_upcycled_from(base_dir), tmp_path / "adapter", base_model=str(base_dir))
    (tmp_path / "adapter" / ADAPTER_NAME).write_bytes(b"not a safetensors file")

    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_upcycled(tmp_path / "adapter")


def test_save_refuses_non_empty_folder(base_dir, tmp_path):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")

    with pytest.raises(FileExistsError, match="not empty"):
        save_upcycled(_upcycled_from(base_dir), target)
    assert (target / "notes.txt").read_text() == "keep me"


def test_overwrite_replaces_folder_whole(base_dir, tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.txt").write_text("old")

    save_upcycled(_upcycled_from(base_dir), target, base_model=str(base_dir), overwrite=True)

    assert sorted(p.name for p in target.iterdir()) == [ADAPTER_NAME, CONFIG_NAME]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_save_requires_upcycled_model(tmp_path):
    with pytest.raises(ValueError, match="not upcycled"):
        save_upcycled(make_tiny_gemma3(), tmp_path / "out")


def test_failed_save_keeps_previous_folder(base_dir, tmp_path, tiny_ids, monkeypatch):
    import errno

    import upcyclebase.checkpoint as checkpoint

    model = _upcycled_from(base_dir)
    save_upcycled(model, tmp_path / "adapter", base_model=str(base_dir))
    before = _logits(load_upcycled(tmp_path / "adapter"), tiny_ids)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_json", disk_full)
    _perturb_extras(model, seed=7)
    with pytest.raises(OSError, match="No space left on device.*previous contents are unchanged"):
        save_upcycled(model, tmp_path / "adapter", base_model=str(base_dir), overwrite=True)

    assert torch.equal(_logits(load_upcycled(tmp_path / "adapter"), tiny_ids), before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter")] == []


def test_interrupted_replace_names_backup(base_dir, tmp_path):
    save_upcycled(_upcycled_from(base_dir), tmp_path / "adapter", base_model=str(base_dir))
    # a save killed between its two renames leaves only the renamed previous folder
    (tmp_path / "adapter").rename(tmp_path / ".adapter.old-abc123")

    with pytest.raises(FileNotFoundError, match=r"\.adapter\.old-abc123"):
        load_upcycled(tmp_path / "adapter")


def test_save_refuses_base_folder(base_dir, tmp_path):
    model = _upcycled_from(base_dir)

    for target in (base_dir, tmp_path):  # the base folder itself, and a folder that contains it
        with pytest.raises(ValueError, match="base weights"):
            save_upcycled(model, target, overwrite=True)

    assert (base_dir / "config.json").is_file()
    assert (base_dir / "model.safetensors").is_file()


def test_relative_base_recorded_absolute(base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = _upcycled_from(base_dir)

    save_upcycled(model, tmp_path / "out", base_model="base")

    record = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    assert record["base_model"] == str(base_dir)
    assert load_upcycled(tmp_path / "out", device="cpu") is not None


def test_saved_files_follow_umask(base_dir, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        save_upcycled(_upcycled_from(base_dir), tmp_path / "out")
    finally:
        os.umask(umask)

    folder = tmp_path / "out"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / ADAPTER_NAME).stat().st_mode) == 0o644
    assert stat.S_IMODE((folder / CONFIG_NAME).stat().st_mode) == 0o644
