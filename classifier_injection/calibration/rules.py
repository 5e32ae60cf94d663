"""The calibration rules, each registered by name: ``synthesize`` (default), ``simulate``, ``logit-match``,
``norm`` and ``none``.

The simulation rules choose a norm factor for the new rows from the old classes alone (a :class:`FactorChoice`,
cacheable per head) and set each new bias against the model's mean feature when it can be estimated. Why the
default is what it is: the decision record in ``docs/``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .base import (
    BiasRule,
    CalibrationContext,
    FactorChoice,
    ScaledCalibration,
    check_bias_rule,
    check_rows,
    fitted,
    mean_norm,
    norm_rows,
    raise_unfitted,
    register_calibration,
)
from .reliability import (
    EXPECTED_COUNTS,
    EXPECTED_SCALES,
    expected_rates,
    reliability_table,
    synthetic_wins,
)
from .simulation import (
    DEFAULT_FACTORS,
    largest_keeping,
    largest_within_budget,
    prototype_gzsl_curve,
    simulate_injections,
    simulated_features,
    simulated_head,
    simulation_diagnostics,
    synthetic_gzsl_curve,
)

__all__ = [
    "LogitMatchCalibration",
    "NoCalibration",
    "NormCalibration",
    "SimulatedCalibration",
    "SynthesizedCalibration",
    "check_simulation_rule",
    "left_out_corrected",
]

_logger = logging.getLogger(__name__)

#: Climb step of the features the expected rates read: twice the factor's, for the same rates in half the time
#: (the factor's own features keep the finer step, on which its constants were chosen).
EXPECTED_STEP = 0.02


@register_calibration("none")
@dataclass(frozen=True)
class NoCalibration:
    """Keep the rows as predicted (the paper's GZSL setting)."""

    name: str = "none"

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        return new_rows.clone()

    def to_dict(self) -> dict:
        return asdict(self)


@register_calibration("norm")
@dataclass(frozen=True)
class NormCalibration:
    """Rescale each new weight vector to ``factor`` x the mean norm of the old ones; biases to the old mean bias.

    Attributes:
        factor: target norm relative to the old rows' mean norm; > 1 favours new classes.
        bias_shift: shift of the new biases in old-bias standard deviations; > 0 favours new classes.
    """

    factor: float = 1.0
    bias_shift: float = 0.0
    name: str = "norm"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"factor must be a finite number > 0, got {self.factor}")
        if not math.isfinite(self.bias_shift):
            raise ValueError(f"bias_shift must be finite, got {self.bias_shift}")

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        check_rows(new_rows, seen_rows)
        biases = seen_rows[:, -1]
        std = biases.std() if len(biases) > 1 else biases.new_zeros(())
        return norm_rows(new_rows, mean_norm(seen_rows) * self.factor, biases.mean() + self.bias_shift * std)

    def to_dict(self) -> dict:
        return asdict(self)


def left_out_corrected(threshold: float, correction: float, context: CalibrationContext) -> float:
    """A rule's ``threshold`` less its ``correction`` (not below 0) when the simulation reuses the injection's fit."""
    return threshold if context.fitted_injector is None else max(threshold - correction, 0.0)


def check_simulation_rule(rule: object) -> None:
    """Checks shared by the rules that simulate an injection (:func:`simulate_injections`)."""
    if not 0 < rule.holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {rule.holdout_fraction}")
    if rule.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {rule.repeats}")
    correction = getattr(rule, "left_out_correction", 0.0)
    if not (math.isfinite(correction) and correction >= 0):
        raise ValueError(f"left_out_correction must be a finite number >= 0, got {correction}")
    if not rule.factors or any(not (math.isfinite(f) and f > 0) for f in rule.factors):
        raise ValueError(f"factors must be a non-empty sequence of finite numbers > 0, got {rule.factors}")
    check_bias_rule(rule.bias)


@register_calibration("simulate")
@dataclass(frozen=True)
class SimulatedCalibration:
    """Leave-classes-out simulation scored on row directions: the smallest factor whose H is near the best.

    Holds out ``holdout_fraction`` of the old classes (``repeats`` times), predicts their rows as new rows
    (:func:`simulate_injections`: the injection's own fit with their rows left out, or a fresh injector refitted on
    the others, ``repeats`` extra fits), and scores every factor on the rows' directions as proxy features
    (:func:`prototype_gzsl_curve`). H is flat around its maximum while old-class accuracy keeps falling, so the rule
    takes the smallest factor whose H is within ``tolerance`` (relative) of the best. It records no expected
    precision or recall: on the kept rows' directions, held-out rows win far more often and far more precisely than
    new rows do on photos.

    Attributes:
        holdout_fraction: share of old classes held out per repeat.
        repeats: number of random hold-outs whose curves are averaged.
        factors: candidate norm factors (x the old rows' mean norm).
        tolerance: accept factors whose simulated H is at least ``(1 - tolerance)`` x the best.
        bias: ``"feature-mean"`` (:func:`feature_mean_biases` when the mean feature is known) or ``"mean"``.
        left_out_correction: taken off ``tolerance`` when the simulation reuses the injection's fit
            (``context.fitted_injector``), whose held-out rows score higher than a refitted injector's would; set so
            that the rule picks the factors of a refit.
    """

    holdout_fraction: float = 0.2
    repeats: int = 1
    factors: tuple[float, ...] = DEFAULT_FACTORS
    tolerance: float = 0.1
    bias: BiasRule = "feature-mean"
    left_out_correction: float = 0.05
    name: str = "simulate"

    def __post_init__(self) -> None:
        check_simulation_rule(self)
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        raise_unfitted(self)

    def simulated_curve(self, context: CalibrationContext) -> torch.Tensor:
        """Mean simulated ``[len(factors), 3]`` (S, U, H in %) over the repeats."""
        context = simulated_head(context)
        seen_rows = context.seen_rows.detach().float().cpu()
        injections = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)
        return torch.stack([prototype_gzsl_curve(seen_rows, h, p, self.factors) for h, p in injections]).mean(0)

    def choose(self, curve: torch.Tensor, tolerance: float | None = None) -> int:
        """Index into ``factors`` of the smallest factor whose simulated H is within ``tolerance`` (default: the
        rule's) of the best."""
        tolerance = self.tolerance if tolerance is None else tolerance
        top = float(curve[:, 2].max())
        order = sorted(range(len(self.factors)), key=lambda i: self.factors[i])
        return next(i for i in order if curve[i, 2] >= (1 - tolerance) * top)

    def tolerance_for(self, context: CalibrationContext) -> float:
        """``tolerance``, less ``left_out_correction`` when the simulation reuses the injection's fit."""
        return left_out_corrected(self.tolerance, self.left_out_correction, context)

    def select(self, context: CalibrationContext) -> FactorChoice:
        """The choice on ``context``'s old classes."""
        curve = self.simulated_curve(context)
        best = self.choose(curve, self.tolerance_for(context))
        factor = float(self.factors[best])
        diagnostics = simulation_diagnostics(self, context, curve[best])
        _logger.info("simulate calibration: factor %.3f (%s)", factor, diagnostics)
        return FactorChoice(self.name, factor, self.bias, 0.0, diagnostics)

    def fit(self, context: CalibrationContext) -> ScaledCalibration:
        return self.select(context).apply(context)

    def to_dict(self) -> dict:
        return asdict(self)


@register_calibration("synthesize")
@dataclass(frozen=True)
class SynthesizedCalibration:
    """Leave-classes-out simulation on features synthesised from the model's statistics (the default).

    The simulated injection of :class:`SimulatedCalibration`, scored on ``samples`` features per old class that
    start at the estimated feature mean plus ``spread`` x the estimated spread and climb the head's log-softmax
    to probability ``confidence`` (:func:`synthesize_features`). New rows get the feature-mean biases plus
    ``offset`` logits, a prior that lets them win where the old head is unsure. The rule takes the largest factor
    whose simulated old-class accuracy falls at most ``max_seen_drop`` points, or the floor when that is larger:
    ``simulate``'s factor (with ``floor_tolerance``) carried over to the factor that costs the simulated old
    classes as much with the offset as it does without. Without feature statistics it is :class:`SimulatedCalibration`.

    Attributes:
        holdout_fraction: share of old classes held out per repeat.
        repeats: number of random hold-outs whose curves are averaged.
        factors: candidate norm factors (x the old rows' mean norm).
        spread: pooled spread over the independent-positions spread of the features.
        confidence: class probability at which a synthesised feature stops climbing.
        max_seen_drop: allowed fall of simulated old-class accuracy, in points.
        left_out_correction: points taken off ``max_seen_drop`` when the simulation reuses the injection's fit
            (``context.fitted_injector``): that fit saw the held-out classes, so their rows cost the kept ones less
            than a refitted injector's would; set so that the rule picks the factors of a refit.
        samples: synthesised features per old class.
        floor_tolerance: ``simulate``'s tolerance for the floor factor; ``None``: no floor.
        offset: logits added to every new row's feature-mean bias.
        neighbour_share: share of the climb's target on a class's nearest rows in the features the expected
            precision and recall are measured on (features that climb to their class alone are far less confused
            with their neighbours than photos are).
        expected_samples: such features per old class.
        win_share: share of the simulated wins counted in the expected recall and old photos taken (precision
            counts them all): new rows win fewer photos than the simulation's rows win features.
    """

    holdout_fraction: float = 0.2
    repeats: int = 1
    factors: tuple[float, ...] = DEFAULT_FACTORS
    spread: float = 3.8
    confidence: float = 0.3
    max_seen_drop: float = 4.0
    left_out_correction: float = 0.5
    samples: int = 4
    floor_tolerance: float | None = 0.1
    offset: float = 1.0
    neighbour_share: float = 0.7
    expected_samples: int = 2
    win_share: float = 0.55
    name: str = "synthesize"

    def __post_init__(self) -> None:
        check_simulation_rule(self)
        if self.samples < 1 or self.expected_samples < 1:
            raise ValueError(f"samples and expected_samples must be >= 1, got {self.samples}, {self.expected_samples}")
        if not 0 <= self.neighbour_share < 1:
            raise ValueError(f"neighbour_share must be in [0, 1), got {self.neighbour_share}")
        if not 0 < self.win_share <= 1:
            raise ValueError(f"win_share must be in (0, 1], got {self.win_share}")
        if not (math.isfinite(self.spread) and self.spread > 0):
            raise ValueError(f"spread must be a finite number > 0, got {self.spread}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if not (math.isfinite(self.max_seen_drop) and self.max_seen_drop >= 0):
            raise ValueError(f"max_seen_drop must be a finite number >= 0, got {self.max_seen_drop}")
        if self.floor_tolerance is not None and not 0 <= self.floor_tolerance < 1:
            raise ValueError(f"floor_tolerance must be None or in [0, 1), got {self.floor_tolerance}")
        if not math.isfinite(self.offset):
            raise ValueError(f"offset must be a finite number (logits), got {self.offset}")

    @property
    def bias(self) -> BiasRule:
        return "feature-mean"

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        raise_unfitted(self)

    def synthesized_features(self, context: CalibrationContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and labels this rule scores on (shared by rules with the same synthesis settings)."""
        return simulated_features(simulated_head(context), self.spread, self.confidence, self.samples, self.name)

    def simulated_curve(self, context: CalibrationContext) -> torch.Tensor:
        """Mean simulated ``[len(factors), 3]`` (S, U, H in %) on synthesised features over the repeats."""
        features, labels = self.synthesized_features(context)
        context = simulated_head(context)
        seen_rows = context.seen_rows.detach().float().cpu()
        mean = context.feature_mean.detach().float().cpu()
        injections = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)
        return torch.stack(
            [
                synthetic_gzsl_curve(seen_rows, h, p, self.factors, features, labels, mean, self.offset)
                for h, p in injections
            ]
        ).mean(0)

    def expected_features(self, context: CalibrationContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Features confused with their classes' neighbours (``neighbour_share``): what the expected rates use."""
        return simulated_features(
            simulated_head(context),
            self.spread,
            self.confidence,
            self.expected_samples,
            self.name,
            neighbour_share=self.neighbour_share,
            step_size=EXPECTED_STEP,
        )

    def reliability(self, context: CalibrationContext, factor: float) -> dict:
        """:func:`reliability_table` of the first simulated injection at ``factor``: what new rows can expect."""
        seen_rows, held, predicted, features, labels, mean = self._first_injection(context)
        wins = synthetic_wins(seen_rows, held, predicted, features, mean, factor, self.offset)
        return reliability_table(wins, labels, seen_rows, held, predicted, self.win_share)

    def expected(
        self,
        context: CalibrationContext,
        factor: float,
        counts: Sequence[int] = EXPECTED_COUNTS,
        scales: Sequence[float] = EXPECTED_SCALES,
    ) -> dict:
        """:func:`expected_rates` of the first simulated injection at ``factor``, per number of new classes."""
        injection = self._first_injection(context)
        return expected_rates(*injection, factor, self.offset, counts, scales, context.seed, self.win_share)

    def _first_injection(self, context: CalibrationContext) -> tuple[torch.Tensor, ...]:
        """``(seen_rows, held_out, predicted_rows, features, labels, feature_mean)``: what the expected rates read."""
        features, labels = self.expected_features(context)
        context = simulated_head(context)
        held, predicted = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)[0]
        seen_rows, mean = context.seen_rows.detach().float().cpu(), context.feature_mean.detach().float().cpu()
        return seen_rows, held, predicted, features, labels, mean

    def _floor(self) -> SimulatedCalibration | None:
        if self.floor_tolerance is None:
            return None
        return SimulatedCalibration(self.holdout_fraction, self.repeats, self.factors, self.floor_tolerance)

    def fit(self, context: CalibrationContext) -> ScaledCalibration:
        return self.select(context).apply(context)

    def select(self, context: CalibrationContext) -> FactorChoice:
        """The choice on ``context``'s old classes."""
        if context.feature_mean is None or context.feature_std is None:
            choice = SimulatedCalibration(self.holdout_fraction, self.repeats, self.factors).select(context)
            _logger.info("synthesize calibration: no feature statistics, fell back to simulate")
            return dataclasses.replace(choice, diagnostics={**choice.diagnostics, "fallback_from": self.name})
        curve = self.simulated_curve(context)
        budget = left_out_corrected(self.max_seen_drop, self.left_out_correction, context)
        best = largest_within_budget(curve, self.factors, budget)
        simulated = len(simulated_head(context).seen_rows)
        extra = {"synthesized_features": self.samples * simulated, "seen_drop_budget": budget}
        extra["budget_factor"] = self.factors[best]
        floor = self._floor()
        if floor is not None:
            floor_index = floor.choose(floor.simulated_curve(context), floor.tolerance_for(context))
            extra["floor_factor"] = self.factors[floor_index]
            if self.offset != 0:
                without_offset = dataclasses.replace(self, offset=0.0, floor_tolerance=None)
                reference = without_offset.simulated_curve(context)
                # The factor that costs the simulated old classes as much with the offset as the floor does without.
                floor_index = largest_keeping(curve, self.factors, float(reference[floor_index, 0]))
                extra["floor_factor_with_offset"] = self.factors[floor_index]
            if self.factors[floor_index] > self.factors[best]:
                best = floor_index
        extra["reliability"] = self.reliability(context, self.factors[best])
        extra["expected"] = self.expected(context, self.factors[best])
        diagnostics = simulation_diagnostics(self, context, curve[best], offset=self.offset, **extra)
        _logger.info("synthesize calibration: factor %.3f (%s)", self.factors[best], diagnostics)
        return FactorChoice(self.name, float(self.factors[best]), "feature-mean", self.offset, diagnostics)

    def to_dict(self) -> dict:
        return asdict(self)


@register_calibration("logit-match")
@dataclass(frozen=True)
class LogitMatchCalibration:
    """Match the logits that new rows produce on prototype features to those of the old rows; no refit.

    Proxy features are the old rows' directions (one per old class). For an old row ``j``, the mean of its
    ``top_k`` largest logits on the prototypes of the *other* classes is how strongly it responds to its
    nearest confusable classes. The new rows get one common norm factor, chosen so that their median
    ``top_k`` response on the old prototypes is ``margin`` x the old rows' median: new rows predicted from
    text respond to many old classes at once (they sit between them), and must out-score those neighbours
    by a margin to ever win; biases follow ``bias``. A common factor keeps the relative norms the injector
    predicted.

    Attributes:
        top_k: how many of the nearest old classes define a row's neighbourhood.
        margin: target ratio of the new rows' neighbourhood logits to the old rows' ones.
        bias: ``"feature-mean"`` or ``"mean"``, as for :class:`SimulatedCalibration`.
    """

    top_k: int = 5
    margin: float = 3.0
    bias: BiasRule = "feature-mean"
    name: str = "logit-match"

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(f"margin must be a finite number > 0, got {self.margin}")
        check_bias_rule(self.bias)

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        return self.fit(CalibrationContext(seen_rows=seen_rows, new_rows=new_rows))(new_rows, seen_rows)

    def fit(self, context: CalibrationContext) -> ScaledCalibration:
        seen_rows = context.seen_rows.detach().float().cpu()
        new_rows = context.new_rows.detach().float().cpu()
        check_rows(new_rows, seen_rows)
        num = len(seen_rows)
        if num < 2:
            raise ValueError(f"the 'logit-match' calibration needs a head with at least 2 classes, this one has {num}")
        k = min(self.top_k, num - 1)
        weights = seen_rows[:, :-1]
        proxies = F.normalize(weights, dim=1)
        old = weights @ proxies.T  # [N, N]: row j's logit on class c's prototype
        old.fill_diagonal_(-math.inf)
        target = old.topk(k, dim=1).values.mean(dim=1).median()
        unit_new = F.normalize(new_rows[:, :-1], dim=1) * mean_norm(seen_rows)
        response = (unit_new @ proxies.T).topk(k, dim=1).values.mean(dim=1).median()  # at factor 1
        # Rows orthogonal to (or opposite) every old class leave nothing to match: fall back to norm matching.
        factor = float(self.margin * target / response) if response > 0 and target > 0 else 1.0
        diagnostics = {
            "old_mean_norm": round(float(mean_norm(seen_rows)), 6),
            "old_neighbourhood_logit": round(float(target), 4),
            "new_neighbourhood_logit": round(float(response), 4),
        }
        return fitted(self.name, factor, self.bias, context, diagnostics)

    def to_dict(self) -> dict:
        return asdict(self)
