"""Save and load upcycled models, PEFT-style: only the new weights plus a JSON config.

An adapter folder contains ``upcycle_config.json`` (base model, shapes, upcycling settings, routing
state) and ``upcycle_adapter.safetensors`` (extra banks and routers), plus the tokenizer.
A full copy also contains the base model as a regular Hugging Face folder, which plain
``AutoModelForCausalLM.from_pretrained`` still loads as the stock model. Loading reads
safetensors and JSON only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ADAPTER_NAME, CONFIG_NAME, FORMAT_VERSION, UpcycleConfig, write_json
from .models import load_base_model
from .upcycle import extra_parameters, moh_modules, set_moh, upcycle

logger = logging.getLogger(__name__)

SELF_BASE = "."  # base_model value of a full copy: the base lives in the same folder
_SHAPE_KEYS = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _shape_record(model: nn.Module) -> dict[str, Any]:
    text = _text_config(model)
    return {key: getattr(text, key) for key in _SHAPE_KEYS}


def check_output_not_base(base_model: str, output_dir: str | Path) -> None:
    """Raise a ValueError if ``output_dir`` is the local base model folder or contains it.

    Replacing such a folder would delete the base weights that the saved adapter needs.
    """
    base = Path(base_model).expanduser()
    if not base.is_dir():
        return
    base, target = base.resolve(), Path(output_dir).expanduser().resolve()
    if target == base or target in base.parents:
        raise ValueError(
            f"Output folder {str(output_dir)!r} is or contains the base model folder {str(base)!r}, "
            "so saving there would delete the base weights; choose another output folder."
        )


def _readable_by_all(folder: Path) -> None:
    """Give the files and folders of ``folder`` the permissions of the umask, as a plain write would.

    ``tempfile.mkdtemp`` creates the staging folder readable by its owner only.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def save_upcycled(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer: Any = None,
    *,
    full_copy: bool = False,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the new weights, the upcycling config and the tokenizer to ``output_dir``.

    Args:
        model: an upcycled model.
        output_dir: destination folder; written under a temporary name and renamed when complete.
        tokenizer: saved next to the weights when given.
        full_copy: also write the base weights, so the folder needs nothing else to load.
        base_model: the base model id or path to record; defaults to the one the model was loaded from.
        overwrite: replace a non-empty ``output_dir``.

    Returns:
        The output folder.
    """
    output_dir = Path(output_dir)
    if not list(moh_modules(model)):
        raise ValueError(f"{type(model).__name__} is not upcycled; call upcyclebase.upcycle(model) before saving.")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {str(output_dir)!r} exists and is not empty; choose another or pass overwrite.")
    base_model = str(base_model or getattr(model, "upcycle_base_model", None) or model.config._name_or_path)
    check_output_not_base(base_model, output_dir)
    if Path(base_model).expanduser().is_dir():
        # A relative path would point elsewhere when the folder is loaded from another directory
        base_model = os.path.abspath(Path(base_model).expanduser())

    extras = {name: param.detach().contiguous().cpu() for name, param in extra_parameters(model).items()}
    record = {
        "format_version": FORMAT_VERSION,
        "base_model": SELF_BASE if full_copy else str(base_model),
        "source_model": str(base_model),
        "architectures": list(getattr(model.config, "architectures", None) or [type(model).__name__]),
        "dtype": str(next(iter(extras.values())).dtype).removeprefix("torch."),
        "shapes": _shape_record(model),
        "upcycle": model.upcycle_config.to_dict(),
    }

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
    try:
        save_file(extras, staging / ADAPTER_NAME, metadata={"format": "pt"})
        write_json(staging / CONFIG_NAME, record)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if full_copy:
            base_state = {k: v for k, v in model.state_dict().items() if k not in extras}
            model.save_pretrained(staging, state_dict=base_state)
        _readable_by_all(staging)
        _fsync_tree(staging)
        _replace_folder(staging, output_dir)
    except OSError as error:
        kept = "the previous contents are unchanged" if output_dir.exists() else "nothing was written there"
        raise OSError(
            error.errno, f"Saving to {str(output_dir)!r} failed ({error.strerror or error}); {kept}. Free disk space or fix permissions and retry."
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("Saved %s upcycled model to %s", "full" if full_copy else "adapter of the", output_dir)
    return output_dir


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` to disk, so the rename never publishes unwritten data."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _replace_folder(staging: Path, output_dir: Path) -> None:
    """Move a complete staging folder into place; the old folder is removed only afterwards."""
    backup = None
    if output_dir.exists():
        backup = output_dir.with_name(f".{output_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        output_dir.rename(backup)
    staging.rename(output_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def read_upcycled_config(folder: str | Path) -> dict[str, Any]:
    """Read and check ``upcycle_config.json`` of an upcycled folder."""
    folder = Path(folder)
    backups = sorted(folder.parent.glob(f".{folder.name}.old-*")) if not folder.is_dir() else []
    if backups:
        raise FileNotFoundError(
            f"Upcycled folder {str(folder)!r} not found, but an interrupted save left the previous version at "
            f"{str(backups[-1])!r}; rename it to {folder.name!r} to use it."
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"Upcycled folder {str(folder)!r} not found; pass a folder written by save_upcycled.")
    for name in (CONFIG_NAME, ADAPTER_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{name} is missing from {str(folder)!r}; save the model again with save_upcycled.")
    try:
        record = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({error}); save the model again.") from error
    if not isinstance(record, dict):
        raise ValueError(f"{folder / CONFIG_NAME} contains a JSON {type(record).__name__}, not an object; save the model again.")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_NAME} has format_version {record.get('format_version')!r}, expected {FORMAT_VERSION}.")
    for key, kind in (("base_model", str), ("shapes", dict), ("upcycle", dict)):
        if not isinstance(record.get(key), kind):
            raise ValueError(f"{folder / CONFIG_NAME}: {key}={record.get(key)!r} is invalid; expected a {kind.__name__}.")
    record["upcycle"] = UpcycleConfig.from_dict(record["upcycle"])
    return record


def _check_base(record: dict[str, Any], model: nn.Module, folder: Path) -> None:
    found = _shape_record(model)
    for key, saved in record["shapes"].items():
        if found.get(key) != saved:
            raise ValueError(
                f"{folder} was made for a base model with {key}={saved!r}, but this base has {key}={found.get(key)!r}; "
                f"load it with the base model {record['source_model']!r}."
            )


def _read_adapter(folder: Path, expected: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    path = folder / ADAPTER_NAME
    try:
        with safe_open(path, framework="pt") as handle:
            names = set(handle.keys())
            if names != set(expected):
                missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
                raise ValueError(
                    f"{path} does not match this base model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                    "load it with the base model it was saved from."
                )
            for name in sorted(names):
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    raise ValueError(f"{path}: {name} has shape {shape}, this base expects {tuple(expected[name].shape)}.")
            return {name: handle.get_tensor(name) for name in names}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); save the model again.") from error


def load_upcycled(
    folder: str | Path,
    base_model: str | nn.Module | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Rebuild an upcycled model from a folder written by :func:`save_upcycled`.

    Args:
        folder: an adapter folder or a full copy.
        base_model: a base model id, path or (not yet upcycled) model object to put the
            new weights on; by default the full copy's own base, else the recorded base id.
        device, dtype: where and how to load the base (see ``resolve_device_dtype``).

    Returns:
        The upcycled model, with the routing state it was saved with.
    """
    folder = Path(folder)
    record = read_upcycled_config(folder)
    if isinstance(base_model, nn.Module):
        model = base_model
    else:
        if base_model is None:
            base_model = str(folder) if record["base_model"] == SELF_BASE else record["base_model"]
        model, _ = load_base_model(
            base_model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, with_tokenizer=False
        )
    _check_base(record, model, folder)

    saved: UpcycleConfig = record["upcycle"]
    upcycle(model, saved)
    params = extra_parameters(model)
    tensors = _read_adapter(folder, params)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    set_moh(model, enabled=saved.enabled, identity_shortcut=saved.identity_shortcut, top_k=saved.top_k)
    model.upcycle_base_model = record["source_model"]
    logger.info("Loaded upcycled model from %s", folder)
    return model
