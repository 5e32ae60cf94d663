"""Research calibration rules: the calibration study's "budget" rows, and the default at a target precision.

:class:`BudgetCalibration` simulates an injection of the head's own classes as the library's rules do, scored on
*noisy* row directions, and keeps the largest factor within an old-class budget. It lost to the default
(``docs/decisions.md``); it stays here so the committed tables can be recomputed. :class:`TargetPrecisionCalibration`
is the default rule with its rows scaled as ``InjectionConfig(target_precision=)`` scales them, so the 5-fold
protocol can measure that setting as a default. Importing this module registers them as ``"budget"`` and
``"synthesize-target"`` with :func:`classifier_injection.calibration.register_calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from classifier_injection.calibration import (
    Calibration,
    CalibrationContext,
    FactorChoice,
    ScaledCalibration,
    SynthesizedCalibration,
    register_calibration,
    simulate_injections,
)
from classifier_injection.calibration.base import BiasRule, raise_unfitted
from classifier_injection.calibration.reliability import scale_for_precision
from classifier_injection.calibration.rules import check_simulation_rule
from classifier_injection.calibration.simulation import (
    DEFAULT_FACTORS,
    gzsl_accuracies,
    largest_within_budget,
    simulation_diagnostics,
)

__all__ = ["BudgetCalibration", "TargetPrecisionCalibration", "noisy_prototype_gzsl_curve", "proxy_noise"]


def proxy_noise(seen_rows: torch.Tensor, accuracy: float, samples: int = 8, seed: int = 0) -> float:
    """Noise scale at which the head scores ``accuracy`` on its own noisy prototypes (bisection).

    A noisy prototype of class ``c`` is the unit direction of its row plus ``noise * N(0, I) / sqrt(D)``
    (:func:`noisy_prototype_gzsl_curve`); the scale grows until the old rows' top-1 falls to ``accuracy``.
    """
    weights = seen_rows[:, :-1].float()
    num, dim = weights.shape
    directions = F.normalize(weights, dim=1).repeat_interleave(samples, 0)
    labels = torch.arange(num).repeat_interleave(samples)
    noise = torch.randn(num * samples, dim, generator=torch.Generator().manual_seed(seed)) / dim**0.5
    low, high = 0.0, 20.0
    for _ in range(25):
        mid = (low + high) / 2
        correct = ((directions + mid * noise) @ weights.T).argmax(1) == labels
        low, high = (mid, high) if correct.float().mean().item() > accuracy else (low, mid)
    return (low + high) / 2


def noisy_prototype_gzsl_curve(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    factors: Sequence[float],
    noise: float,
    samples: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """:func:`~classifier_injection.calibration.simulation.prototype_gzsl_curve` on ``samples`` noisy prototypes
    per class (see :func:`proxy_noise`): with noise the old head is imperfect on them, so simulated S falls with the
    factor as real old-class accuracy does."""
    num, dim = seen_rows.shape[0], seen_rows.shape[1] - 1
    held = torch.zeros(num, dtype=torch.bool)
    held[held_out] = True
    kept_w = seen_rows[~held, :-1].float()
    generator = torch.Generator().manual_seed(seed)
    proxies = F.normalize(seen_rows[:, :-1].float(), dim=1).repeat_interleave(samples, 0)
    proxies = proxies + noise * torch.randn(num * samples, dim, generator=generator) / dim**0.5
    labels = torch.arange(num).repeat_interleave(samples)
    new_w = F.normalize(predicted_rows[:, :-1].float(), dim=1) * kept_w.norm(dim=1).mean()
    best_old, arg_old = (proxies @ kept_w.T).max(dim=1)
    best_new, arg_new = (proxies @ new_w.T).max(dim=1)
    wins = torch.tensor(list(factors), dtype=torch.float32)[:, None] * best_new[None] > best_old[None]
    return gzsl_accuracies(wins, arg_old, arg_new, labels, held_out, num)


@register_calibration("budget")
@dataclass(frozen=True)
class BudgetCalibration:
    """Leave-classes-out simulation on noisy prototypes: the largest factor within an old-class budget.

    The simulated injection of the library's rules, scored on noisy row directions (noise set so the head scores
    ``proxy_accuracy`` on its own, :func:`proxy_noise`); the rule takes the largest factor whose simulated old-class
    accuracy is at most ``max_seen_drop`` points below its value at the smallest factor.

    Attributes:
        holdout_fraction: share of old classes held out per repeat.
        repeats: number of random hold-outs whose curves are averaged.
        factors: candidate norm factors (x the old rows' mean norm).
        proxy_accuracy: the head's top-1 on its own noisy prototypes (sets the noise).
        max_seen_drop: allowed fall of simulated old-class accuracy, in points.
        samples: noisy prototypes per class.
        bias: ``"feature-mean"`` or ``"mean"``, as for the library's rules.
    """

    holdout_fraction: float = 0.2
    repeats: int = 1
    factors: tuple[float, ...] = DEFAULT_FACTORS
    proxy_accuracy: float = 0.9
    max_seen_drop: float = 6.0
    samples: int = 8
    bias: BiasRule = "feature-mean"
    name: str = "budget"

    def __post_init__(self) -> None:
        check_simulation_rule(self)
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 0 < self.proxy_accuracy < 1:
            raise ValueError(f"proxy_accuracy must be in (0, 1), got {self.proxy_accuracy}")
        if not (math.isfinite(self.max_seen_drop) and self.max_seen_drop >= 0):
            raise ValueError(f"max_seen_drop must be a finite number >= 0, got {self.max_seen_drop}")

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        raise_unfitted(self)

    def fit(self, context: CalibrationContext) -> ScaledCalibration:
        return self.select(context).apply(context)

    def select(self, context: CalibrationContext) -> FactorChoice:
        """The choice on ``context``'s old classes (shares the context's simulated injections)."""
        seen_rows = context.seen_rows.detach().float().cpu()
        injections = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)
        noise = proxy_noise(seen_rows, self.proxy_accuracy, self.samples, context.seed)
        curve = torch.stack(
            [
                noisy_prototype_gzsl_curve(seen_rows, held, predicted, self.factors, noise, self.samples, context.seed)
                for held, predicted in injections
            ]
        ).mean(0)
        best = largest_within_budget(curve, self.factors, self.max_seen_drop)
        diagnostics = simulation_diagnostics(self, context, curve[best], proxy_noise=round(noise, 6))
        return FactorChoice(self.name, float(self.factors[best]), self.bias, 0.0, diagnostics)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Rescaled:
    """A fitted calibration whose rows are then multiplied by ``scale``, as ``new_class_scale`` multiplies them."""

    inner: Calibration
    scale: float
    name: str = "synthesize-target"

    @property
    def diagnostics(self) -> dict:
        return {**getattr(self.inner, "diagnostics", {}), "target_scale": self.scale}

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        return self.inner(new_rows, seen_rows) * self.scale

    def to_dict(self) -> dict:
        return {**self.inner.to_dict(), "name": self.name, "target_scale": self.scale}


@register_calibration("synthesize-target")
@dataclass(frozen=True)
class TargetPrecisionCalibration:
    """The default rule; its rows then scaled to the largest scale whose expected precision, at the number of rows
    injected, reaches ``target`` (a fraction): ``InjectionConfig(target_precision=target)`` as a default."""

    target: float = 0.3
    name: str = "synthesize-target"

    def fit(self, context: CalibrationContext) -> Calibration:
        fitted = SynthesizedCalibration().fit(context)
        table = getattr(fitted, "diagnostics", {}).get("expected")
        found = scale_for_precision(table, len(context.new_rows), 100 * self.target)
        return _Rescaled(fitted, 1.0 if found is None else found[0])

    def to_dict(self) -> dict:
        return asdict(self)
