"""Saving and loading injected models and injectors: safetensors and JSON only, written atomically.

An injected model is saved in timm's own Hugging Face layout (``model.safetensors`` + ``config.json``),
so ``timm.create_model("local-dir:DIR", pretrained=True)`` reloads it with all label names. The
``config.json`` carries an extra top-level ``"classifier_injection"`` block (ignored by timm) with the
provenance of every injection and the row segments of the head, which :func:`load_injected` uses to
restore bit-identical old logits.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .heads import find_head, head_segments, restore_segments

__all__ = ["atomic_save_safetensors", "load_injected", "read_safetensors", "save_injected"]

CONFIG_KEY = "classifier_injection"
_MAX_CONFIG_BYTES = 64 * 1024 * 1024


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> None:
    """Write a safetensors file via a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a clear error for anything that is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors file ({err})") from err
    return tensors, metadata


def _read_config(directory: Path) -> dict:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: is it a directory written by save_injected()?")
    if config_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ValueError(f"{config_path} is larger than {_MAX_CONFIG_BYTES} bytes: refusing to parse it")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    return config


def save_injected(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a (possibly injected) timm model to directory ``path`` in timm's own format, atomically.

    Writes ``model.safetensors`` and ``config.json`` (with ``label_names`` and the injection provenance).
    The directory is first written under a temporary name beside ``path`` and renamed into place, so a
    failure never leaves a half-written model. An existing ``path`` is replaced only if ``overwrite``.
    """
    from timm.models import save_for_hf

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True to replace it")
    head = find_head(model)
    record = dict(getattr(model, "classifier_injection", None) or {})
    record["segments"] = list(head_segments(model, head))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    model_config: dict = {CONFIG_KEY: record}
    if cfg.get("label_names"):
        model_config["label_names"] = list(cfg["label_names"])

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
        if path.exists():
            # Swap: move the old directory aside first so the new one lands with a single rename.
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_injected(path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Load a model written by :func:`save_injected` (safetensors + JSON only; never unpickles).

    Old logits are bit-identical to the saved model's: the head's row segments are restored.
    """
    import timm

    path = Path(path)
    config = _read_config(path)
    record = config.get(CONFIG_KEY)
    if not isinstance(record, dict):
        raise ValueError(f"{path}/config.json has no {CONFIG_KEY!r} block: use timm.create_model('local-dir:...')")
    architecture, num_classes = config.get("architecture"), config.get("num_classes")
    if not isinstance(architecture, str) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{path}/config.json: 'architecture' must be a string and 'num_classes' a positive int")
    model_args = config.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise ValueError(f"{path}/config.json: 'model_args' must be an object")
    weights = path / "model.safetensors"
    tensors, _ = read_safetensors(weights)

    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not match {architecture} with {num_classes} classes ({err})") from err
    model.eval()

    segments = record.get("segments")
    if not isinstance(segments, list) or not all(isinstance(s, int) for s in segments):
        raise ValueError(f"{path}/config.json: {CONFIG_KEY}.segments must be a list of ints")
    restore_segments(model, find_head(model), segments)
    saved_cfg = config.get("pretrained_cfg") or {}
    if not isinstance(saved_cfg, dict):
        raise ValueError(f"{path}/config.json: 'pretrained_cfg' must be an object")
    pretrained_cfg = {**model.pretrained_cfg, **saved_cfg, "num_classes": num_classes}
    label_names = config.get("label_names")
    if label_names is not None:
        if not isinstance(label_names, list) or len(label_names) != num_classes:
            raise ValueError(f"{path}/config.json: label_names must be a list of {num_classes} names")
        pretrained_cfg["label_names"] = list(label_names)
    model.pretrained_cfg = pretrained_cfg
    model.classifier_injection = {k: v for k, v in record.items() if k != "segments"}
    if device is not None:
        model.to(device)
    return model
