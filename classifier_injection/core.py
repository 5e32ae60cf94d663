"""The tensor-level core of an injection: the head's rows and the classes' descriptors in, new rows out.

:func:`predict_rows` fits the injector on the old classes, predicts the new rows and calibrates them. It knows
nothing of models: :func:`~classifier_injection.inject` wraps it for a timm model, and the benchmark harness
calls it directly on a fold.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import FitCache
from .calibration import (
    Calibration,
    CalibrationContext,
    FittableCalibration,
    apply_new_class_scale,
    fit_calibration,
    get_calibration,
)
from .calibration.base import ChoiceStore
from .features import FeatureStatistics
from .injector import Injector

__all__ = [
    "RowPrediction",
    "calibration_context",
    "copying_factory",
    "head_fingerprint",
    "needs_context",
    "predict_rows",
]


@dataclass(frozen=True)
class RowPrediction:
    """What :func:`predict_rows` returns.

    Attributes:
        rows: the calibrated new rows ``[K, D + 1]``, ``new_class_scale`` applied.
        calibration: the fitted rule that produced them (its ``to_dict()`` is the provenance).
        seconds: wall time of the ``fit`` (0 for a trained injector or a cached fit), ``predict`` and
            ``calibration`` steps.
        hparams: the injector's ``hparams()`` after its fit.
    """

    rows: torch.Tensor
    calibration: Calibration
    seconds: dict[str, float] = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)


def head_fingerprint(rows: torch.Tensor) -> str:
    """A short hash of a head's rows: identifies the head an injector was trained on."""
    data = rows.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy())  # the buffer itself: a head of 22k classes is not copied to be hashed
    return digest.hexdigest()[:16]


def copying_factory(injector: object) -> Callable[[], object]:
    """A factory of fresh injectors configured like ``injector``: deep copies of it taken now."""
    template = copy.deepcopy(injector)
    return lambda: copy.deepcopy(template)


def needs_context(calibration: Calibration | FittableCalibration) -> bool:
    """Whether a rule must be fitted on a :class:`CalibrationContext` (and so needs the seen descriptors)."""
    return isinstance(calibration, FittableCalibration)


def calibration_context(
    seen_rows: torch.Tensor,
    new_rows: torch.Tensor,
    seen_descriptors: torch.Tensor | None,
    new_descriptors: torch.Tensor | None,
    injector_factory: Callable[[], object] | None,
    *,
    features: FeatureStatistics | None = None,
    seed: int = 0,
    fitted_injector: Callable[[], object] | None = None,
) -> CalibrationContext:
    """The context :func:`predict_rows` fits a calibration on: the head, the rows, the descriptors, the statistics."""
    return CalibrationContext(
        seen_rows=seen_rows,
        new_rows=new_rows,
        seen_descriptors=seen_descriptors,
        new_descriptors=new_descriptors,
        injector_factory=injector_factory,
        fitted_injector=fitted_injector,
        seed=seed,
        feature_mean=features.mean if features is not None else None,
        feature_source=features.source if features is not None else None,
        feature_std=features.std if features is not None else None,
    )


def predict_rows(
    seen_rows: torch.Tensor,
    seen_descriptors: torch.Tensor | None,
    new_descriptors: torch.Tensor,
    injector: Injector,
    calibration: str | Calibration | FittableCalibration | None = None,
    *,
    features: FeatureStatistics | None = None,
    seed: int = 0,
    new_class_scale: float = 1.0,
    choices: ChoiceStore | None = None,
    fits: FitCache | None = None,
) -> RowPrediction:
    """Predict and calibrate the rows of new classes from the head's rows and the descriptors.

    Args:
        seen_rows: the head's rows ``[N, D + 1]`` (``[W | b]``).
        seen_descriptors: descriptors ``[N, d]`` of the old classes; may be ``None`` only when ``injector`` is
            already fitted and the calibration needs no context.
        new_descriptors: descriptors ``[K, d]`` of the new classes.
        injector: an :class:`~classifier_injection.injector.Injector`; fitted here unless ``is_fitted``.
        calibration: a rule or its name (:func:`~classifier_injection.calibration.get_calibration`).
        features: the head's estimated input statistics, if known (lets rules set biases and synthesise features).
        seed: seed of the fit and of the calibration's random choices.
        new_class_scale: factor on the new classes' logits after calibration (the trade-off knob).
        choices: where simulation rules keep their choice per head (a ``CalibrationCache``).
        fits: where an unfitted injector's fit is kept; a fit made before on the same inputs is read from it
            instead (the injector comes back trained either way).
    """
    rule = get_calibration(calibration)
    contextual = needs_context(rule)
    fitted = bool(getattr(injector, "is_fitted", False))
    if seen_descriptors is None and (contextual or not fitted):
        raise ValueError("seen_descriptors are needed to fit the injector or a calibration that simulates an injection")
    # Taken before the fit: a simulation that cannot reuse the fit refits fresh copies of the injector as it was given.
    factory = copying_factory(injector) if contextual else None
    key = None if fitted or fits is None else fits.key(injector, seen_rows, seen_descriptors, new_descriptors, seed)
    restored = key is not None and fits.restore(key, injector, seen_descriptors, seen_rows)
    predicted, seconds = _fit_predict(injector, fitted or restored, seen_rows, seen_descriptors, new_descriptors, seed)
    if key is not None and not restored and torch.isfinite(predicted).all():
        fits.put(key, injector)
    hparams = injector.hparams() if callable(getattr(injector, "hparams", None)) else {}
    start = time.perf_counter()
    if contextual:
        context = calibration_context(
            seen_rows,
            predicted,
            seen_descriptors,
            new_descriptors,
            factory,
            features=features,
            seed=seed,
            fitted_injector=_reusable_fit(injector, fitted, seen_rows),
        )
        rule = fit_calibration(rule, context, choices)
    rows = apply_new_class_scale(rule(predicted, seen_rows), new_class_scale)
    seconds["calibration"] = time.perf_counter() - start
    if not torch.isfinite(rows).all():
        raise RuntimeError("the injector produced non-finite rows; try another seed or injector")
    return RowPrediction(rows, rule, seconds, hparams)


def _reusable_fit(injector: Injector, trained: bool, seen_rows: torch.Tensor) -> Callable[[], object] | None:
    """The fit the calibration's simulation reuses (its rows left out) instead of a refit, or ``None``.

    This injection's fit, or a ``trained`` injector's when it was trained on exactly these rows. Only injectors with
    ``can_leave_out`` qualify.
    """
    if getattr(injector, "can_leave_out", False) is not True:
        return None
    if trained and getattr(injector, "fingerprint", None) != head_fingerprint(seen_rows):
        return None  # trained on a part of this head (it grew since): its blends lack the newer rows
    return lambda: injector


def _fit_predict(
    injector: Injector,
    fitted: bool,
    seen_rows: torch.Tensor,
    seen_descriptors: torch.Tensor | None,
    new_descriptors: torch.Tensor,
    seed: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit ``injector`` (seeded, the caller's RNG untouched) unless ``fitted``; its rows for ``new_descriptors``."""
    seconds = {"fit": 0.0}
    start = time.perf_counter()
    if not fitted:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            injector.fit(seen_descriptors, seen_rows, new_descriptors)
        seconds["fit"] = time.perf_counter() - start
    start = time.perf_counter()
    predicted = injector.predict(new_descriptors)
    seconds["predict"] = time.perf_counter() - start
    return predicted, seconds
