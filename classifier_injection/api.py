"""``inject``: the one call that gives a timm classifier new classes from their names.

A thin wrapper around :func:`~classifier_injection.core.predict_rows`: find the head, describe the classes,
predict the rows, grow the head, record what was done.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ._version import __version__
from .cache import EmbeddingCache, FitCache, resolve_cache
from .calibration import CalibrationCache, apply_new_class_scale, get_calibration
from .calibration.reliability import assess, expected_at, least_reliable, scale_for_precision
from .config import InjectionConfig
from .core import head_fingerprint, needs_context, predict_rows
from .descriptors import default_config_for, describe_injection, embed_classes, seen_class_names
from .embedders import Embedder, default_embedder
from .features import feature_statistics
from .heads import ClassifierHead, find_head, head_segments
from .icis import ICISInjector
from .injector import Injector

__all__ = ["MAX_NEW_CLASSES", "check_new_class_names", "existing_names", "inject"]

_logger = logging.getLogger(__name__)

#: Most classes one inject() call adds: the most that was measured to stay within 4 x a 22k-class head's memory
#: (benchmarks/results/scaling). Larger sets go in batches that reuse one trained injector.
MAX_NEW_CLASSES = 2_000


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def existing_names(names: Sequence[str], existing: Sequence[str]) -> list[str]:
    """The ``names`` that already name one of ``existing`` (compared ignoring case and spacing)."""
    existing_keys = {_key(e) for e in existing}
    return [n for n in names if _key(n) in existing_keys]


def check_new_class_names(
    new_class_names: Sequence[str], existing: Sequence[str] = (), allow_existing: bool = True
) -> list[str]:
    """The names as a list, or a ``TypeError`` / ``ValueError`` that says which name is wrong and why."""
    if isinstance(new_class_names, str) or not isinstance(new_class_names, Sequence):
        raise TypeError(
            "new_class_names must be a list of strings, e.g. ['capybara', 'red panda'], got "
            f"{type(new_class_names).__name__}"
        )
    names = list(new_class_names)
    if not names:
        raise ValueError("new_class_names is empty: give at least one class name to inject")
    if len(names) > MAX_NEW_CLASSES:
        raise ValueError(
            f"new_class_names has {len(names)} names, more than MAX_NEW_CLASSES={MAX_NEW_CLASSES} per call: "
            "inject them in batches, passing the same trained injector (injector=...) to every call so that it "
            "is fitted once"
        )
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"new_class_names[{i}] must be a string, got {type(name).__name__} ({name!r})")
        if not name.strip():
            raise ValueError(f"new_class_names[{i}] is empty or whitespace: every class needs a name")
    # Names that differ only in case or spacing are the same class to a text embedder.
    first: dict[str, int] = {}
    duplicates = []
    for i, name in enumerate(names):
        j = first.setdefault(_key(name), i)
        if j != i:
            duplicates.append(f"{names[j]!r} (#{j}) = {name!r} (#{i})")
    if duplicates:
        raise ValueError(
            f"new_class_names contains duplicates {', '.join(duplicates[:5])} (compared ignoring case and "
            "spacing): give each class once"
        )
    if not allow_existing:
        clash = existing_names(names, existing)
        if clash:
            raise ValueError(
                f"{clash} already name classes of this head; pass InjectionConfig(allow_existing=True) to add "
                "them anyway"
            )
    return names


def inject(
    model: nn.Module,
    new_class_names: Sequence[str],
    config: InjectionConfig | None = None,
    *,
    descriptions: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
    embedder: Embedder | None = None,
    injector: Injector | None = None,
    cache: EmbeddingCache | str | os.PathLike | bool = True,
    inplace: bool = False,
    seed: int = 0,
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
        config: the method's knobs (descriptors, ICIS settings, calibration, ``new_class_scale``, ...).
        descriptions: optional ``{class name: description}``, each key a new or existing class name exactly;
            other classes get their WordNet definition when WordNet knows the name.
        class_names: names of the ``N`` existing classes in head order (default: the model's label names).
        embedder: text embedder; default all-MiniLM-L6-v2.
        injector: any :class:`~classifier_injection.injector.Injector` (default ICIS); a trained ICIS injector
            is reused without refitting after checking it was trained on this head.
        cache: on-disk cache of text embeddings, calibration choices and the default injector's fits (a head
            injected into before skips its fit): ``True`` (the default folder), ``False``, a folder or an
            :class:`~classifier_injection.cache.EmbeddingCache`.
        inplace: modify and return ``model`` itself; otherwise ``model`` is left untouched.
        seed: seed of everything random (same inputs and seed give the same rows).

    Returns:
        The extended model: ``num_classes == N + K``, ``pretrained_cfg["label_names"]`` = old + new names, old
        logits bit-identical to the input model's, provenance in ``model.classifier_injection``.
    """
    config, head, seen_names, names = _check_inputs(model, new_class_names, config, injector, class_names, descriptions)
    embedder = embedder or default_embedder(show_progress=config.progress)
    rule = get_calibration(config.calibration)
    start = time.perf_counter()
    features = feature_statistics(model, head) if needs_context(rule) else None
    if config.target_precision is not None and features is None:
        raise ValueError(_NO_EXPECTED_RATES)  # before any work: without statistics there are no expected rates
    seen_rows = head.rows(model)
    fingerprint = head_fingerprint(seen_rows)
    trained = bool(getattr(injector, "is_fitted", False))
    if trained:
        _check_trained_on(injector, model, head, seen_rows)
    descriptor_config = config.descriptors or default_config_for(embedder)
    disk_cache = resolve_cache(cache)
    # Seen and new classes are described by the same rules (definitions for both, or for neither).
    described = describe_injection(
        model,
        seen_names,
        names,
        embedder=embedder,
        config=descriptor_config,
        descriptions=descriptions,
        class_names=class_names,
    )
    new_descriptors = embed_classes(embedder, names, descriptor_config, described.new, cache=disk_cache)
    # Fits are cached only for the library's own injector: one the caller passes is the caller's to keep.
    fits = FitCache(disk_cache.directory / "fits") if injector is None and disk_cache is not None else None
    if injector is None:
        injector = ICISInjector(config.icis, seed=seed, progress=config.progress, device=_accelerator(model))
    seen_descriptors = None
    if not trained or needs_context(rule):
        seen_descriptors = embed_classes(embedder, seen_names, descriptor_config, described.seen, cache=disk_cache)
    choices = CalibrationCache(disk_cache.directory / "calibration") if disk_cache is not None else None
    del disk_cache  # its copy of the embedding file is done with
    prediction = predict_rows(
        seen_rows,
        seen_descriptors,
        new_descriptors,
        injector,
        rule,
        features=features,
        seed=seed,
        new_class_scale=config.new_class_scale,
        choices=choices,
        fits=fits,
    )
    if not trained and hasattr(injector, "fingerprint"):
        injector.fingerprint = fingerprint
    diagnostics = getattr(prediction.calibration, "diagnostics", {})
    scale, rows = config.new_class_scale, prediction.rows
    if config.target_precision is not None:
        scale = _scale_for_target(diagnostics.get("expected"), len(names), config.target_precision)
        rows = apply_new_class_scale(rows, scale)
    # The simulation's per-class rates hold at new_class_scale 1 only; other scales get the neighbours alone.
    table = diagnostics.get("reliability") if scale == 1 else None
    ranked = [len(names) >= _RANKED_FROM and d is not None for d in described.new]
    reliability = _reliability(rows, table, seen_rows, seen_names, names, ranked)
    expected = expected_at(diagnostics.get("expected"), len(names), scale)
    method = getattr(injector, "name", type(injector).__name__)
    hparams = prediction.hparams
    elapsed = time.perf_counter() - start
    # Done with: freed before the grown head is built (the fitted injector holds the rows and the descriptors).
    del seen_rows, seen_descriptors, injector

    target = model if inplace else _copy_without_head(model, head)
    _grow(target, head, rows, seen_names, names, descriptions)
    record = dict(getattr(target, "classifier_injection", None) or {})
    record["library_version"] = __version__
    record["injections"] = [
        *record.get("injections", []),
        {
            "names": names,
            "num_classes_before": head.num_classes,
            "method": method,
            "hparams": hparams,
            "embedder": embedder.id,
            "descriptors": descriptor_config.to_dict(),
            "descriptions": described.provenance,
            "calibration": prediction.calibration.to_dict(),
            "new_class_scale": scale,
            "target_precision": config.target_precision,
            "reliability": reliability,
            "expected": expected,
            "seed": seed,
            "head": {"path": head.path, "family": head.family, "fingerprint": fingerprint},
            "seconds": round(elapsed, 3),
        },
    ]
    target.classifier_injection = record
    _logger.info("injected %d classes into %s in %.2fs", len(names), type(target).__name__, elapsed)
    return target


#: Injections of at least this many new classes name their least reliable described classes in a warning: the
#: simulation's ranking held on photos there (with descriptions, from 10 classes), not for one class nor for names
#: alone (``docs/decisions.md``).
_RANKED_FROM = 10

_NO_EXPECTED_RATES = (
    "target_precision needs the expected rates of the 'synthesize' calibration, which this model lacks (its "
    "feature statistics could not be estimated): set new_class_scale instead"
)


def _scale_for_target(table: dict | None, new_classes: int, target: float) -> float:
    """The ``new_class_scale`` for ``target_precision`` (a fraction) from the calibration's expected rates."""
    found = scale_for_precision(table, new_classes, 100 * target)
    if found is None:
        raise ValueError(_NO_EXPECTED_RATES)
    scale, reached = found
    if not reached:
        warnings.warn(
            f"no new_class_scale is expected to reach precision {target:.0%} for {new_classes} new classes; used "
            f"{scale:g}, the most precise the calibration's simulation found",
            UserWarning,
            stacklevel=3,
        )
    return scale


def _reliability(
    rows: torch.Tensor,
    table: dict | None,
    seen_rows: torch.Tensor,
    seen_names: Sequence[str],
    names: Sequence[str],
    ranked: Sequence[bool],
) -> dict[str, dict]:
    """Per new class: its nearest old classes and, from the calibration's simulation (its reliability ``table``, if
    any), expected precision / recall.

    Warns about the ``ranked`` classes in the simulation's least precise bin.
    """
    entries = assess(rows, seen_rows, seen_names, table)
    worst = [(names[i], entries[i]) for i in least_reliable(entries, table) if ranked[i]]
    if worst:
        listing = ", ".join(f"{name!r} (near {e['nearest'][0][0]!r})" for name, e in worst[:5])
        more = f" and {len(worst) - 5} more" if len(worst) > 5 else ""
        warnings.warn(
            f"least reliable new classes: {listing}{more}. Their rows sit closest to the old classes named, and "
            f"the calibration's simulation expects rows like them to be right {worst[0][1]['expected_precision']:.0f} "
            "% of the times they win. Pass "
            "descriptions={name: '...'} saying what tells each apart from its neighbours; "
            "model.classifier_injection['injections'][-1]['reliability'] has every class",
            UserWarning,
            stacklevel=3,
        )
    return dict(zip(names, entries, strict=True))


def _accelerator(model: nn.Module) -> torch.device | None:
    """The model's CUDA device, where ICIS trains too (float32 maths); ``None`` for models on the CPU."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None and parameter.device.type == "cuda" else None


def _check_inputs(
    model: nn.Module,
    new_class_names: Sequence[str],
    config: InjectionConfig | None,
    injector: Injector | None,
    class_names: Sequence[str] | None,
    descriptions: Mapping[str, str] | None,
) -> tuple[InjectionConfig, ClassifierHead, list[str], list[str]]:
    """The config, the model's head, its classes' names and the new ones, checked; warns about train mode."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm nn.Module, got {type(model).__name__}")
    config = _check_config(config, injector)
    head = find_head(model, allow_projection=config.allow_projection)
    seen_names = seen_class_names(model, head.num_classes, class_names)
    names = check_new_class_names(new_class_names, seen_names, config.allow_existing)
    _check_descriptions(descriptions, seen_names, names)
    if model.training:
        # Growing the head does not depend on the mode; only what the caller does next with the model does.
        warnings.warn(
            f"{type(model).__name__} is in train mode: injection works the same, and the returned model stays in "
            "train mode (dropout, batch-norm updates); call .eval() on it before predicting",
            UserWarning,
            stacklevel=3,
        )
    return config, head, seen_names, names


def _check_descriptions(
    descriptions: Mapping[str, str] | None, seen_names: Sequence[str], names: Sequence[str]
) -> None:
    """Every key names a class exactly and every text is a non-empty string: a misspelt key would go unused."""
    if descriptions is None:
        return
    if not isinstance(descriptions, Mapping):
        raise TypeError(f"descriptions must be a mapping name -> text, got {type(descriptions).__name__}")
    classes = {*names, *seen_names}
    for name, text in descriptions.items():
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"descriptions[{name!r}] must be a non-empty string, got {text!r}")
        if name not in classes:
            near = existing_names([*names, *seen_names], [name]) if isinstance(name, str) else []
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(
                f"descriptions has {name!r}, which names no new class and no class of the head: {hint}keys must "
                "match new_class_names (or the head's class names) exactly"
            )


def _check_config(config: InjectionConfig | None, injector: Injector | None) -> InjectionConfig:
    if config is None:
        return InjectionConfig()
    if not isinstance(config, InjectionConfig):
        raise TypeError(f"config must be an InjectionConfig, got {type(config).__name__}")
    if injector is not None and config.icis is not None:
        raise ValueError(
            "config.icis configures the default ICIS injector, but injector= was given too: configure that "
            "injector instead (e.g. ICISInjector(config)), or leave out injector="
        )
    return config


def _check_trained_on(injector: Injector, model: nn.Module, head: ClassifierHead, seen_rows: torch.Tensor) -> None:
    """A trained injector must come from this head, or from the part of it that earlier injections extended."""
    trained_on = getattr(injector, "fingerprint", None)
    prefixes = itertools.accumulate(head_segments(model, head))
    if trained_on is not None and trained_on not in {head_fingerprint(seen_rows[:n]) for n in prefixes}:
        raise ValueError(
            f"this injector was trained on another head (fingerprint {trained_on}, this head "
            f"{head_fingerprint(seen_rows)}): train a new one on this model, or pass injector=None"
        )


def _copy_without_head(model: nn.Module, head: ClassifierHead) -> nn.Module:
    """A deep copy of ``model`` that shares the head's layers, which :func:`_grow` replaces and never modifies."""
    shared = (model.get_submodule(path) for path in head.paths)
    return copy.deepcopy(model, memo={id(layer): layer for layer in shared})


def _grow(
    model: nn.Module,
    head: ClassifierHead,
    new_rows: torch.Tensor,
    seen_names: Sequence[str],
    names: Sequence[str],
    descriptions: Mapping[str, str] | None,
) -> None:
    """Grow ``model``'s head by ``new_rows`` and its metadata by ``names``; all or nothing, old logits checked."""
    metadata_keys = ("num_classes", "pretrained_cfg", "default_cfg")
    old_metadata = {k: getattr(model, k) for k in metadata_keys if hasattr(model, k)}
    features = head.example_features(model)
    with torch.no_grad():
        before = head.logits(model, features)
    undo = head.grow(model, new_rows)
    try:
        with torch.no_grad():
            after = head.logits(model, features)
        if after.shape[-1] != head.num_classes + len(names) or not torch.equal(after[..., : head.num_classes], before):
            raise RuntimeError("internal error: the grown head does not reproduce the old logits exactly")
        _update_metadata(model, seen_names, names, descriptions)
    except BaseException:
        # All-or-nothing: put the original layer and metadata back (matters for inplace=True).
        undo()
        for key, value in old_metadata.items():
            setattr(model, key, value)
        raise


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
