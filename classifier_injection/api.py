"""``inject``: the one call that gives a timm classifier new classes from their names."""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import __version__
from .calibration import Calibration, get_calibration
from .descriptors import DescriptorConfig, embed_classes, seen_class_names
from .embedders import Embedder, default_embedder
from .heads import find_head
from .icis import ICISConfig, ICISInjector
from .injector import Injector

__all__ = ["head_fingerprint", "inject"]

_logger = logging.getLogger(__name__)


def head_fingerprint(rows: torch.Tensor) -> str:
    """A short hash of a head's rows: identifies the head an injector was trained on."""
    data = rows.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _validate_new_names(new_class_names: Sequence[str], existing: Sequence[str], allow_existing: bool) -> list[str]:
    if isinstance(new_class_names, str) or not isinstance(new_class_names, Sequence):
        raise TypeError(
            "new_class_names must be a list of strings, e.g. ['capybara', 'red panda'], got "
            f"{type(new_class_names).__name__}"
        )
    names = list(new_class_names)
    if not names:
        raise ValueError("new_class_names is empty: give at least one class name to inject")
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"new_class_names[{i}] must be a string, got {type(name).__name__} ({name!r})")
        if not name.strip():
            raise ValueError(f"new_class_names[{i}] is empty or whitespace: every class needs a name")
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicates:
        raise ValueError(f"new_class_names contains duplicates {duplicates}: give each class once")
    if not allow_existing:
        existing_lower = {e.strip().lower() for e in existing}
        clash = [n for n in names if n.strip().lower() in existing_lower]
        if clash:
            raise ValueError(f"{clash} already name classes of this head; pass allow_existing=True to add them anyway")
    return names


def inject(
    model: nn.Module,
    new_class_names: Sequence[str],
    *,
    embedder: Embedder | None = None,
    class_names: Sequence[str] | None = None,
    descriptions: Mapping[str, str] | None = None,
    descriptor_config: DescriptorConfig | None = None,
    injector: Injector | None = None,
    icis_config: ICISConfig | None = None,
    calibration: str | Calibration | None = None,
    inplace: bool = False,
    allow_existing: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Give a timm classifier new classes, predicted from their names alone.

    Example:
        >>> model = timm.create_model("resnet50", pretrained=True)
        >>> model = inject(model, ["capybara", "red panda"])
        >>> model.num_classes, model.pretrained_cfg["label_names"][-2:]
        (1002, ['capybara', 'red panda'])

    Args:
        model: a timm classification model with ``N`` classes.
        new_class_names: the ``K`` classes to add, as plain text.
        embedder: text embedder for descriptors; default all-MiniLM-L6-v2 (:func:`default_embedder`).
        class_names: names of the ``N`` existing classes, in head order. Default: the model's
            ``pretrained_cfg["label_names"]`` when readable, else timm's ImageNet metadata.
        descriptions: optional ``{class name: description}`` used by templates with ``{description}``.
        descriptor_config: how names become texts (templates); see :class:`DescriptorConfig`.
        injector: any :class:`~classifier_injection.injector.Injector`; default ICIS. An ICIS injector
            that is already trained (e.g. :meth:`ICISInjector.load`) is reused without refitting, after
            checking it was trained on this head.
        icis_config: hyper-parameters of the default ICIS injector.
        calibration: ``"norm"`` (default), ``"none"`` or a :class:`~classifier_injection.calibration.Calibration`.
        inplace: modify and return ``model`` itself; otherwise ``model`` is left untouched.
        allow_existing: allow names that already name a class of the head.
        seed: seed of everything random (same inputs and seed give the same rows).
        progress: show progress bars.

    Returns:
        The extended model: ``num_classes == N + K``, ``pretrained_cfg["label_names"]`` = old + new
        names, old logits bit-identical to the input model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm nn.Module, got {type(model).__name__}")
    head = find_head(model)
    num_old = head.num_classes
    seen_names = seen_class_names(model, num_old, class_names)
    names = _validate_new_names(new_class_names, seen_names, allow_existing)
    if descriptions is not None and not isinstance(descriptions, Mapping):
        raise TypeError(f"descriptions must be a mapping name -> text, got {type(descriptions).__name__}")

    embedder = embedder or default_embedder()
    calibrate = get_calibration(calibration)
    start = time.perf_counter()
    seen_rows = head.rows(model)
    fingerprint = head_fingerprint(seen_rows)
    new_descriptors = embed_classes(embedder, names, descriptor_config, descriptions)

    if injector is None:
        injector = ICISInjector(icis_config, seed=seed, progress=progress)
    if getattr(injector, "is_fitted", False):
        trained_on = getattr(injector, "fingerprint", None)
        if trained_on is not None and trained_on != fingerprint:
            raise ValueError(
                f"this injector was trained on another head (fingerprint {trained_on}, this head {fingerprint}): "
                "train a new one on this model, or pass injector=None"
            )
    else:
        seen_descriptors = embed_classes(embedder, seen_names, descriptor_config, descriptions)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            injector.fit(seen_descriptors, seen_rows, new_descriptors)
        if hasattr(injector, "fingerprint"):
            injector.fingerprint = fingerprint
    new_rows = calibrate(injector.predict(new_descriptors), seen_rows)
    if not torch.isfinite(new_rows).all():
        raise RuntimeError("the injector produced non-finite rows; try another seed or injector")
    elapsed = time.perf_counter() - start

    target = model if inplace else copy.deepcopy(model)
    old_metadata = (getattr(target, "num_classes", None), getattr(target, "pretrained_cfg", None))
    features = head.example_features(target)
    with torch.no_grad():
        before = head.logits(target, features)
    undo = head.grow(target, new_rows)
    try:
        with torch.no_grad():
            after = head.logits(target, features)
        if after.shape[-1] != num_old + len(names) or not torch.equal(after[..., :num_old], before):
            raise RuntimeError("internal error: the grown head does not reproduce the old logits exactly")
        _update_metadata(target, seen_names, names, descriptions)
    except BaseException:
        # All-or-nothing: put the original layer and metadata back (matters for inplace=True).
        undo()
        target.num_classes, target.pretrained_cfg = old_metadata
        raise

    record = dict(getattr(target, "classifier_injection", None) or {})
    record["library_version"] = __version__
    record.setdefault("injections", [])
    record["injections"] = [
        *record["injections"],
        {
            "names": names,
            "num_classes_before": num_old,
            "method": getattr(injector, "name", type(injector).__name__),
            "hparams": injector.hparams() if hasattr(injector, "hparams") else {},
            "embedder": embedder.id,
            "descriptors": (descriptor_config or DescriptorConfig()).to_dict(),
            "descriptions": {n: descriptions[n] for n in names if descriptions and n in descriptions},
            "calibration": calibrate.to_dict(),
            "seed": seed,
            "head": {"path": head.path, "family": head.family, "fingerprint": fingerprint},
            "seconds": round(elapsed, 3),
        },
    ]
    target.classifier_injection = record
    _logger.info("injected %d classes into %s in %.2fs", len(names), type(target).__name__, elapsed)
    return target


def _update_metadata(
    model: nn.Module, seen_names: Sequence[str], names: Sequence[str], descriptions: Mapping[str, str] | None
) -> None:
    num_classes = len(seen_names) + len(names)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    old_labels = cfg.get("label_names")
    if not old_labels or len(old_labels) != len(seen_names):
        old_labels = list(seen_names)
    cfg["label_names"] = [*old_labels, *names]
    label_descriptions = cfg.get("label_descriptions")
    if isinstance(label_descriptions, dict):
        cfg["label_descriptions"] = {
            **label_descriptions,
            **{n: (descriptions or {}).get(n, n) for n in names},
        }
    cfg["num_classes"] = num_classes
    model.pretrained_cfg = cfg
    if hasattr(model, "default_cfg"):
        model.default_cfg = cfg
    model.num_classes = num_classes
