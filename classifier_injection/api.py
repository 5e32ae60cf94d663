"""``inject``: the one call that gives a timm classifier new classes from their names."""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import time
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from . import __version__
from .cache import EmbeddingCache, resolve_cache
from .calibration import (
    Calibration,
    CalibrationContext,
    FittableCalibration,
    apply_new_class_scale,
    check_new_class_scale,
    copying_factory,
    fit_calibration,
    get_calibration,
)
from .calibration_cache import CalibrationCache
from .descriptors import DescriptorConfig, default_config_for, describe_injection, embed_classes, seen_class_names
from .embedders import Embedder, default_embedder
from .features import feature_statistics
from .heads import find_head, head_segments
from .icis import ICISConfig, ICISInjector
from .injector import Injector

__all__ = ["MAX_NEW_CLASSES", "head_fingerprint", "inject"]

_logger = logging.getLogger(__name__)

#: Most classes one inject() call adds (ImageNet-21k fits). Bounds memory and time: every new class costs a
#: text embedding, a latent vector and a head row. Larger sets go in batches that reuse one trained injector.
MAX_NEW_CLASSES = 25_000


def head_fingerprint(rows: torch.Tensor) -> str:
    """A short hash of a head's rows: identifies the head an injector was trained on."""
    data = rows.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode() + data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _validate_new_names(new_class_names: Sequence[str], existing: Sequence[str], allow_existing: bool) -> list[str]:
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
        existing_keys = {_key(e) for e in existing}
        clash = [n for n in names if _key(n) in existing_keys]
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
    embedding_cache: EmbeddingCache | str | bool = True,
    injector: Injector | None = None,
    icis_config: ICISConfig | None = None,
    calibration: str | Calibration | FittableCalibration | None = None,
    new_class_scale: float = 1.0,
    inplace: bool = False,
    allow_existing: bool = False,
    allow_projection: bool = False,
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
        descriptions: optional ``{class name: description}``, e.g. ``{"capybara": "a large South American
            rodent"}``. Classes without one get their WordNet definition when the name is a WordNet lemma
            (seen classes of ImageNet heads: by WordNet id); see the ``"descriptions"`` provenance entry.
        descriptor_config: how classes become texts (templates, WordNet look-up and its ambiguity policy,
            ``use_definitions=False`` to turn definitions off); see :class:`DescriptorConfig`.
        embedding_cache: on-disk cache of text embeddings (the seen classes are embedded once per embedder)
            and, in its ``calibration/`` folder, of the calibration's choice per head (a second injection into
            the same head with the same injector, descriptors and seed skips the simulation, about two thirds of
            the time; :mod:`~classifier_injection.calibration_cache`): ``True`` (``$CLASSIFIER_INJECTION_CACHE``
            or ``~/.cache/classifier_injection/embeddings``), ``False``, a directory or an
            :class:`~classifier_injection.cache.EmbeddingCache`.
        injector: any :class:`~classifier_injection.injector.Injector`; default ICIS. An ICIS injector
            that is already trained (e.g. :meth:`ICISInjector.load`, or one passed to an earlier call) is reused
            without refitting, after checking it was trained on this head (or on the part of it that the earlier
            injections extended); when the calibration's choice for this very head is cached too (another set of
            classes for the same base model), such a call takes about a second (``examples/grow.py``).
        icis_config: hyper-parameters of the default ICIS injector.
        calibration: how the predicted rows get their scale and bias, from the model alone (no photo):
            ``"synthesize"`` (default: re-runs the injection on held-out old classes, one more injector fit, and
            keeps the largest scale whose simulated cost to the old classes stays within a budget, scored on
            features synthesised from the BatchNorm statistics before the pool, with new biases raised by a
            constant prior of 1 logit, and never below ``"simulate"``'s scale carried over that prior; models
            without those statistics fall back to ``"simulate"``),
            ``"simulate"`` (the same re-run scored on the rows' own directions), ``"logit-match"`` (no refit;
            favours the new classes), ``"budget"``, ``"norm"``, ``"none"``, or an instance from
            :mod:`classifier_injection.calibration`.
            New biases are set against the model's mean feature when it can be estimated from the BatchNorm
            before the pool (:func:`~classifier_injection.features.feature_statistics`; one forward pass on a
            random input), else to the old rows' mean bias. The chosen scale and biases go into the provenance.
        new_class_scale: trade-off knob, multiplies the new classes' logits after calibration: > 1 raises
            recall on the new classes at the cost of accuracy on the old ones, < 1 the reverse, 1 keeps the
            calibration's balance (S/U curve: ``benchmarks/results/calibration_tradeoff.png``).
        inplace: modify and return ``model`` itself; otherwise ``model`` is left untouched.
        allow_existing: allow names that already name a class of the head.
        allow_projection: extend a CLIP-style projection head anyway (its outputs are embedding dimensions, not
            classes; refused by default, see :func:`~classifier_injection.heads.find_head`).
        seed: seed of everything random (same inputs and seed give the same rows).
        progress: show progress bars.

    Returns:
        The extended model: ``num_classes == N + K``, ``pretrained_cfg["label_names"]`` = old + new
        names, old logits bit-identical to the input model's.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm nn.Module, got {type(model).__name__}")
    head = find_head(model, allow_projection=allow_projection)
    num_old = head.num_classes
    seen_names = seen_class_names(model, num_old, class_names)
    names = _validate_new_names(new_class_names, seen_names, allow_existing)
    if descriptions is not None and not isinstance(descriptions, Mapping):
        raise TypeError(f"descriptions must be a mapping name -> text, got {type(descriptions).__name__}")
    if model.training:
        # Growing the head does not depend on the mode; only what the caller does next with the model does.
        warnings.warn(
            f"{type(model).__name__} is in train mode: injection works the same, and the returned model stays in "
            "train mode (dropout, batch-norm updates); call .eval() on it before predicting",
            UserWarning,
            stacklevel=2,
        )

    embedder = embedder or default_embedder(show_progress=progress)
    calibrate = get_calibration(calibration)
    new_class_scale = check_new_class_scale(new_class_scale)
    start = time.perf_counter()
    seen_rows = head.rows(model)
    fingerprint = head_fingerprint(seen_rows)
    descriptor_config = descriptor_config or default_config_for(embedder)
    cache = resolve_cache(embedding_cache)
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
    new_descriptors = embed_classes(embedder, names, descriptor_config, described.new, cache=cache)

    if injector is None:
        injector = ICISInjector(icis_config, seed=seed, progress=progress)
    # Rules like "synthesize" re-run the injection on held-out old classes with fresh copies of the injector.
    needs_context = isinstance(calibrate, FittableCalibration)
    injector_factory = copying_factory(injector) if needs_context else None
    seen_descriptors = None
    if getattr(injector, "is_fitted", False):
        trained_on = getattr(injector, "fingerprint", None)
        # The head it was trained on may have grown since (earlier injections append segments after it).
        prefixes = itertools.accumulate(head_segments(model, head))
        if trained_on is not None and trained_on not in {head_fingerprint(seen_rows[:n]) for n in prefixes}:
            raise ValueError(
                f"this injector was trained on another head (fingerprint {trained_on}, this head {fingerprint}): "
                "train a new one on this model, or pass injector=None"
            )
    else:
        seen_descriptors = embed_classes(embedder, seen_names, descriptor_config, described.seen, cache=cache)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            injector.fit(seen_descriptors, seen_rows, new_descriptors)
        if hasattr(injector, "fingerprint"):
            injector.fingerprint = fingerprint
    predicted = injector.predict(new_descriptors)
    if needs_context:
        if seen_descriptors is None:
            seen_descriptors = embed_classes(embedder, seen_names, descriptor_config, described.seen, cache=cache)
        stats = feature_statistics(model, head)
        context = CalibrationContext(
            seen_rows=seen_rows,
            new_rows=predicted,
            seen_descriptors=seen_descriptors,
            new_descriptors=new_descriptors,
            injector_factory=injector_factory,
            seed=seed,
            feature_mean=stats.mean if stats is not None else None,
            feature_source=stats.source if stats is not None else None,
            feature_std=stats.std if stats is not None else None,
        )
        choices = CalibrationCache(cache.directory / "calibration") if cache is not None else None
        calibrate = fit_calibration(calibrate, context, choices)
    new_rows = apply_new_class_scale(calibrate(predicted, seen_rows), new_class_scale)
    if not torch.isfinite(new_rows).all():
        raise RuntimeError("the injector produced non-finite rows; try another seed or injector")
    elapsed = time.perf_counter() - start

    target = model if inplace else copy.deepcopy(model)
    metadata_keys = ("num_classes", "pretrained_cfg", "default_cfg")
    old_metadata = {k: getattr(target, k) for k in metadata_keys if hasattr(target, k)}
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
        for key, value in old_metadata.items():
            setattr(target, key, value)
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
            "descriptors": descriptor_config.to_dict(),
            "descriptions": described.provenance,
            "calibration": calibrate.to_dict(),
            "new_class_scale": new_class_scale,
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
