"""Saving and loading injected models and injectors: safetensors and JSON only, written atomically.

An injected model is saved in timm's own Hugging Face layout (``model.safetensors`` + ``config.json``),
so ``timm.create_model("local-dir:DIR", pretrained=True)`` reloads it with all label names. The
``config.json`` carries an extra top-level ``"classifier_injection"`` block (ignored by timm) with the
provenance of every injection, the row segments of the head (which :func:`load_injected` uses to
restore bit-identical old logits) and a SHA-256 of the weights file (which detects corruption).

Loading treats every file as untrusted: nothing is unpickled, ``config.json`` is parsed as plain JSON and
checked field by field, the safetensors header is size-checked before it is parsed, and the model is
first built on PyTorch's ``meta`` device (no memory) so that keys, shapes and dtypes of the file are
checked before any real allocation. Every problem is a :class:`ValueError` (or ``FileNotFoundError``)
that names the file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .card import model_card
from .heads import find_head, head_segments, restore_segments
from .serialization import check_state_dict, default_permissions, few, fsync, read_safetensors

__all__ = ["CONFIG_KEY", "check_output_path", "load_injected", "read_saved_config", "save_injected"]

#: Top-level key of ``config.json`` holding this library's record (provenance, segments, checksum).
CONFIG_KEY = "classifier_injection"
#: Files :func:`save_injected` writes; ``overwrite=True`` only ever replaces a directory holding nothing else.
SAVED_FILES = frozenset({"README.md", "config.json", "model.safetensors"})
MAX_CONFIG_BYTES = 32 * 1024 * 1024
#: Bound on ``num_classes`` in a config (the largest timm heads have ~22k classes).
MAX_CLASSES = 1_000_000
MAX_LABEL_CHARS = 10_000
#: ``create_model`` arguments that load files or fetch weights: never taken from a config file.
_FORBIDDEN_MODEL_ARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "checkpoint_path",
        "cache_dir",
        "scriptable",
        "exportable",
        "no_jit",
        "device",
        "dtype",
        "pretrained_model_args",
    }
)
_INTERPOLATIONS = frozenset({"nearest", "bilinear", "bicubic", "box", "hamming", "lanczos", "random"})
_CROP_MODES = frozenset({"center", "squash", "border"})


# --------------------------------------------------------------------------------------------------
# safetensors files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# config.json


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _read_json(path: Path, max_bytes: int = MAX_CONFIG_BYTES) -> Any:
    """Parse a JSON file of bounded size; NaN/Infinity and pathological nesting are errors."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{path} is {size} bytes, more than the {max_bytes} allowed: refusing to parse it")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        # json.JSONDecodeError is a ValueError; RecursionError comes from absurdly nested input.
        raise ValueError(f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:200]})") from err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_names(value: Any, num_classes: int, where: str) -> list[str]:
    if not isinstance(value, list) or len(value) != num_classes:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{where} must be a list of {num_classes} names (one per class), got {got}")
    for i, name in enumerate(value):
        if not isinstance(name, str) or len(name) > MAX_LABEL_CHARS:
            raise ValueError(f"{where}[{i}] must be a string of at most {MAX_LABEL_CHARS} characters")
    return list(value)


def _check_data_config(cfg: dict, where: str) -> None:
    """The preprocessing fields timm reads from ``pretrained_cfg`` must have sane types and ranges."""
    size = cfg.get("input_size")
    if size is not None and not (
        isinstance(size, list) and len(size) == 3 and all(_is_int(s) and 1 <= s <= 16384 for s in size)
    ):
        raise ValueError(f"{where}.input_size must be [channels, height, width] of positive ints, got {size!r}")
    channels = size[0] if size else None
    for key in ("mean", "std"):
        value = cfg.get(key)
        if value is None:
            continue
        if not (isinstance(value, list) and value and all(_is_number(v) for v in value)):
            raise ValueError(f"{where}.{key} must be a list of numbers, got {value!r:.100}")
        if channels is not None and len(value) not in (1, channels):
            raise ValueError(f"{where}.{key} has {len(value)} values for {channels} input channels")
        if key == "std" and any(v <= 0 for v in value):
            raise ValueError(f"{where}.std must be positive, got {value!r}")
    if cfg.get("interpolation") is not None and cfg["interpolation"] not in _INTERPOLATIONS:
        raise ValueError(
            f"{where}.interpolation must be one of {sorted(_INTERPOLATIONS)}, got {cfg['interpolation']!r:.100}"
        )
    if cfg.get("crop_pct") is not None and not (_is_number(cfg["crop_pct"]) and 0 < cfg["crop_pct"] <= 4):
        raise ValueError(f"{where}.crop_pct must be a number in (0, 4], got {cfg['crop_pct']!r:.100}")
    if cfg.get("crop_mode") is not None and cfg["crop_mode"] not in _CROP_MODES:
        raise ValueError(f"{where}.crop_mode must be one of {sorted(_CROP_MODES)}, got {cfg['crop_mode']!r:.100}")


def _check_model_args(model_args: Any, num_classes: int, where: str) -> dict:
    if not isinstance(model_args, dict):
        raise ValueError(f"{where} must be an object of model arguments, got {type(model_args).__name__}")
    forbidden = sorted(set(model_args) & _FORBIDDEN_MODEL_ARGS)
    if forbidden:
        raise ValueError(f"{where} sets {forbidden}: loading arguments are never taken from a file")
    args = {}
    for key, value in model_args.items():
        if key.startswith("_") or not key.isidentifier():
            raise ValueError(f"{where} has an invalid argument name {key!r:.100}")
        if isinstance(value, (dict, list)) and len(json.dumps(value)) > 10_000:
            raise ValueError(f"{where}.{key} is implausibly large for a model argument")
        args[key] = value
    saved_classes = args.pop("num_classes", num_classes)
    if saved_classes != num_classes:
        raise ValueError(f"{where}.num_classes ({saved_classes!r}) differs from num_classes ({num_classes})")
    return args


def read_saved_config(path: str | os.PathLike, *, require_record: bool = True) -> dict:
    """The validated ``config.json`` of a directory written by :func:`save_injected` (weights not read).

    Args:
        path: the directory.
        require_record: demand the ``"classifier_injection"`` block; ``False`` also accepts a plain timm
            ``save_for_hf`` directory (its head then counts as one segment).

    Returns:
        The config dict, with ``model_args`` cleaned (no ``num_classes``) and the record under
        :data:`CONFIG_KEY` (``{}`` for a plain timm directory).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory: give a directory written by save_injected()")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} has no config.json: is it a directory written by save_injected()?")
    config = _read_json(config_path)
    where = str(config_path)
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(config).__name__}")

    architecture, num_classes = config.get("architecture"), config.get("num_classes")
    import timm

    if not isinstance(architecture, str) or ":" in architecture or not timm.is_model(architecture):
        raise ValueError(
            f"{where}: 'architecture' must name a timm model (timm.list_models()), got {architecture!r:.100}"
        )
    if not _is_int(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"{where}: 'num_classes' must be an int in [1, {MAX_CLASSES}], got {num_classes!r:.100}")
    config["model_args"] = _check_model_args(config.get("model_args") or {}, num_classes, f"{where}: model_args")

    config["pretrained_cfg"] = _checked_labels(config, num_classes, where)
    record = config.get(CONFIG_KEY)
    if record is None and not require_record:
        record = {"segments": [num_classes]}
    config[CONFIG_KEY] = _checked_record(record, num_classes, where)
    return config


def _checked_labels(config: dict, num_classes: int, where: str) -> dict:
    """A saved config's ``pretrained_cfg``, checked: its data config, the label names (top level and in it), and its
    label descriptions."""
    pretrained_cfg = config.get("pretrained_cfg") or {}
    if not isinstance(pretrained_cfg, dict):
        raise ValueError(f"{where}: 'pretrained_cfg' must be an object, got {type(pretrained_cfg).__name__}")
    _check_data_config(pretrained_cfg, f"{where}: pretrained_cfg")
    for key, cfg in (("label_names", config), ("pretrained_cfg.label_names", pretrained_cfg)):
        if cfg.get("label_names") is not None:
            _check_names(cfg["label_names"], num_classes, f"{where}: {key}")
    descriptions = pretrained_cfg.get("label_descriptions")
    if descriptions is not None and not (
        isinstance(descriptions, dict)
        and all(isinstance(v, str) and len(v) <= MAX_LABEL_CHARS for v in descriptions.values())
    ):
        raise ValueError(f"{where}: pretrained_cfg.label_descriptions must map names to strings")
    return pretrained_cfg


def _checked_record(record: object, num_classes: int, where: str) -> dict:
    """A saved injection record: head segments that add up to ``num_classes``, injections, weights checksum."""
    if not isinstance(record, dict):
        raise ValueError(
            f"{where} has no {CONFIG_KEY!r} block: it was not written by save_injected(); "
            "load it with timm.create_model('local-dir:...') instead"
        )
    segments = record.get("segments")
    if not (
        isinstance(segments, list)
        and segments
        and all(_is_int(s) and s > 0 for s in segments)
        and sum(segments) == num_classes
    ):
        raise ValueError(f"{where}: {CONFIG_KEY}.segments must be positive ints summing to {num_classes}")
    injections = record.get("injections", [])
    if not isinstance(injections, list) or not all(isinstance(i, dict) for i in injections):
        raise ValueError(f"{where}: {CONFIG_KEY}.injections must be a list of objects")
    checksum = record.get("weights_sha256")
    if checksum is not None and not (isinstance(checksum, str) and len(checksum) == 64):
        raise ValueError(f"{where}: {CONFIG_KEY}.weights_sha256 must be a 64-character hex string")
    return record


# --------------------------------------------------------------------------------------------------
# models


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Check that :func:`save_injected` may write to ``path``, before any expensive work.

    An existing ``path`` is replaced only when asked, and only if it holds nothing but a saved model.

    Raises:
        FileExistsError: ``path`` exists and may not (or must never) be replaced.
    """
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory: choose another output path")
    entries = {p.name for p in path.iterdir()}
    if not entries:
        return  # an empty directory loses nothing
    if not overwrite:
        raise FileExistsError(f"{path} already exists: pass overwrite=True to replace it")
    foreign = sorted(entries - SAVED_FILES)
    if foreign:
        raise FileExistsError(
            f"refusing to replace {path}: it holds files save_injected() did not write ({few(foreign)}); "
            "choose another output path"
        )


def save_injected(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save a (possibly injected) timm model to directory ``path`` in timm's own format, atomically.

    Writes ``model.safetensors``, ``config.json`` (with ``label_names``, the injection provenance, the
    head's row segments and the weights' SHA-256) and a Hugging Face model card ``README.md``
    (:func:`~classifier_injection.card.model_card`; loading never reads it). The directory is first written
    under a temporary name beside ``path`` and renamed into place, so a failure never leaves a half-written model.

    Args:
        model: the model to save (any device and dtype; it is not modified).
        path: output directory. An existing non-empty one is replaced only if ``overwrite``, and only if it
            holds nothing but a previously saved model (never a directory of other files).
        overwrite: replace an existing saved model at ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from timm.models import save_for_hf

    path = Path(path)
    check_output_path(path, overwrite)
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
        weights = tmp / "model.safetensors"
        fsync(weights)
        # The checksum goes into config.json after the weights exist; load_injected verifies it.
        config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        config[CONFIG_KEY]["weights_sha256"] = _sha256(weights)
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        fsync(tmp / "config.json")
        (tmp / "README.md").write_text(model_card(config, base_model=cfg.get("hf_hub_id")), encoding="utf-8")
        fsync(tmp / "README.md")
        # mkdtemp's directory and safetensors' file are private (0700 / 0600); a saved model reads like any other.
        mode = default_permissions()
        for file in tmp.iterdir():
            os.chmod(file, mode)
        os.chmod(tmp, default_permissions(directory=True))
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


def load_injected(
    path: str | os.PathLike, *, device: str | torch.device | None = None, require_record: bool = True
) -> nn.Module:
    """Load a model written by :func:`save_injected` (safetensors + JSON only; never unpickles).

    Old logits are bit-identical to the saved model's: the head's row segments are restored. The dtype
    the model was saved in (float32, float16, bfloat16...) is kept.

    Args:
        path: the directory.
        device: move the model there after loading.
        require_record: if ``False``, also load a plain timm ``save_for_hf`` directory (safetensors only).

    Raises:
        FileNotFoundError: no directory, ``config.json`` or ``model.safetensors``.
        ValueError: anything wrong in the files (named precisely in the message).
    """
    import timm

    path = Path(path)
    config = read_saved_config(path, require_record=require_record)
    record = config[CONFIG_KEY]
    architecture, num_classes, model_args = config["architecture"], config["num_classes"], config["model_args"]
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no model.safetensors (only safetensors weights are loaded, never pickles)")
    checksum = record.get("weights_sha256")
    if checksum is not None and _sha256(weights) != checksum:
        raise ValueError(
            f"{weights} does not match the SHA-256 recorded in config.json: the file is corrupted or was "
            "modified; save or download it again"
        )
    tensors, _ = read_safetensors(weights)

    # Build on the meta device first: config sizes are checked against the file before any allocation.
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as err:
        raise ValueError(f"{path}/config.json: cannot build {architecture} from its model_args ({err})") from err
    parameter_names = {name for name, _ in skeleton.named_parameters()}
    dtype = check_state_dict(tensors, skeleton.state_dict(), weights, parameters=parameter_names)
    del skeleton

    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes, **model_args)
    if dtype is not None and dtype != torch.float32:
        model.to(dtype)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    restore_segments(model, find_head(model), record["segments"])

    pretrained_cfg = {**model.pretrained_cfg, **config["pretrained_cfg"], "num_classes": num_classes}
    if config.get("label_names") is not None:
        pretrained_cfg["label_names"] = list(config["label_names"])
    model.pretrained_cfg = pretrained_cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = pretrained_cfg
    model.classifier_injection = {k: v for k, v in record.items() if k not in ("segments", "weights_sha256")}
    if device is not None:
        model.to(device)
    return model
