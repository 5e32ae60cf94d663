"""Calibration: give predicted rows a scale and bias at which they can compete with the old rows.

Injectors trained with a cosine loss (ICIS) predict the *direction* of a row; plain regressors shrink
norms towards the mean. Either way, uncalibrated new rows almost never win once the old rows compete in
the extended head (measured on a real 1000-class head: unseen accuracy 0-1 %). How far they must be scaled
up depends on how good the predicted directions are, which depends on the injector, the descriptors and
the head, so no constant factor fits every case.

A calibration maps predicted rows ``[K, D + 1]`` to final rows. Rules that need more than the rows (to
simulate an injection on the model's own classes) first get a :class:`CalibrationContext` through
``fit(context)``, which returns a fitted calibration. No rule ever sees a photo. The simulation rules choose
from the old classes alone (``select(context)`` -> :class:`FactorChoice`), so ``inject()`` keeps their choice
per head (:mod:`classifier_injection.calibration_cache`) and a later injection into the same head reuses it.

Rules:

* ``"none"`` (:class:`NoCalibration`): rows as predicted (the paper's GZSL setting).
* ``"norm"`` (:class:`NormCalibration`): every new weight vector gets ``factor`` x the mean norm of the
  old ones; the simple baseline.
* ``"synthesize"`` (:class:`SynthesizedCalibration`, the default): leave-classes-out simulation. Hold out some of
  the model's own classes, inject them with a fresh copy of the same injector and the same descriptors, and
  score them against the remaining rows on features *synthesised from the model's statistics* (the BatchNorm
  before the pool gives their mean and spread; each is pushed up the head's log-softmax to a fixed confidence),
  with the new rows' biases raised by a constant prior of 1 logit; keep the largest norm factor whose simulated
  old-class accuracy falls at most 4 points, but no less than the factor ``simulate`` picks (carried over the
  offset: the one that costs the simulated old classes as much). Models that hide those statistics get
  ``simulate``.
* ``"simulate"`` (:class:`SimulatedCalibration`): the same simulation scored on the rows' own directions as
  proxy features, taking the smallest factor whose simulated H is within 10 % of the best.
* ``"budget"`` (:class:`BudgetCalibration`, opt-in): the same simulation on *noisy* row directions (noise set so
  the head scores 90 % on its own), taking the largest factor whose simulated old-class accuracy falls at most 6
  points. Isotropic noise charges blurry rows (ridge) for confusions real features do not have (lite0 H ~11 vs
  ~30).
* ``"logit-match"`` (:class:`LogitMatchCalibration`): no refit. Scale each new row so that its logits on
  the prototype features of the old classes are spread like those of the old rows on the classes *near*
  them (their top-ranked competitors).

The fitted rules then set each new row's bias against the model's mean feature ``mu`` when the model lets
it be estimated without images (:mod:`classifier_injection.features`: a BatchNorm before global pooling, as in
EfficientNet/MobileNet): ``b_i = mean_j(w_j . mu + b_j) - w_i . mu`` (:func:`feature_mean_biases`); otherwise
every new row gets the old rows' mean bias. A row blended from many old rows keeps their common component and
scores high on every image; the bias takes that back, as the old rows' biases were trained to.

The trade-off between old-class accuracy and new-class recall is set by ``inject(new_class_scale=...)``
(:func:`apply_new_class_scale`): a factor on the new classes' logits after calibration.

Measured with the library defaults (ICIS with the mixture decoder, "{name}: {definition}" MiniLM descriptors with
ambiguous names averaged over their senses; ``benchmarks/results/calibration_icis_default_lite0.md`` and
``..._lite12.md``; 5 folds of 200 new classes; H, share of the test-picked H, S drop):

=========  =====================  =====================  =====================  ======================  ===========
model      ``synthesize``         no offset (previous)   ``simulate``           ``logit-match``         test-picked
=========  =====================  =====================  =====================  ======================  ===========
lite0      36.1, 88 %, 13.4       35.5, 86 %, 14.7       35.1, 85 %, 14.5       40.5, 98 %, 28.7        41.1, 34.0
lite1      41.6, 94 %, 14.6       36.2, 82 %, 12.3       35.0, 79 %, 11.2       42.7, 96 %, 24.2        44.4, 29.6
lite2      40.4, 90 %, 8.8        35.7, 79 %, 7.8        31.4, 70 %, 6.1        44.1, 98 %, 28.6        45.0, 32.5
=========  =====================  =====================  =====================  ======================  ===========

(test-picked: the factor with the best H on the test photos, an upper bound no rule may use; searching the offset
too, the bound is 45.0 / 47.9 / 50.2.) With ridge rows on lite0 ``synthesize`` gives H 31.3 at S drop 17.8 (no
offset: 30.8 at 20.9; ``simulate`` 29.9 at 19.7). The bias rule was chosen on held-out *seen* classes
(``benchmarks/results/calibration_bias.md``); the offset of 1 with lite1's test folds in view (offsets 2 and 3
give more H but lose 16.5 and 22.2 points of lite1's old-class accuracy; ``benchmarks/results/calibration_notes.md``).
Scored on the photos at other test resolutions, which change the models' confidence more than a change of model
did, offset 1 is the most robust of offsets 0-3 (``benchmarks/results/calibration_shift.md``).

Default: ``synthesize``. The old classes are what the user already relies on: it keeps old-class accuracy within
9-15 points of the original with ICIS rows, where ``logit-match`` loses 24-29 for ~1-4 more points of H.
``new_class_scale`` > 1 trades old-class accuracy for new-class recall (the knob curves in the tables);
``SynthesizedCalibration(offset=2.0, max_seen_drop=6.0)`` favours the new classes more (lite0 / lite1 / lite2:
H 38.4 / 44.7 / 44.4 at S drop 12.7 / 16.5 / 8.9).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "BudgetCalibration",
    "Calibration",
    "CalibrationContext",
    "FactorChoice",
    "FittableCalibration",
    "LogitMatchCalibration",
    "NoCalibration",
    "NormCalibration",
    "ScaledCalibration",
    "SimulatedCalibration",
    "SynthesizedCalibration",
    "apply_new_class_scale",
    "check_new_class_scale",
    "copying_factory",
    "default_calibration",
    "feature_mean_biases",
    "fit_calibration",
    "get_calibration",
    "noisy_prototype_gzsl_curve",
    "prototype_gzsl_curve",
    "proxy_noise",
    "simulate_injections",
    "synthesize_features",
    "synthetic_gzsl_curve",
]

_logger = logging.getLogger(__name__)

#: Candidate norm factors, 0.5 ... 6.0 in steps of 0.025: near the chosen factor old-class accuracy moves
#: ~7 points per 0.1, so a coarser grid overshoots the smallest acceptable factor.
DEFAULT_FACTORS: tuple[float, ...] = tuple(round(0.5 + 0.025 * i, 3) for i in range(221))


@runtime_checkable
class Calibration(Protocol):
    """Maps predicted rows to final rows; ``to_dict()`` is recorded in the provenance of injected models."""

    name: str

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        """Calibrated copy of ``new_rows`` given the head's ``seen_rows`` (both ``[*, D + 1]``)."""
        ...

    def to_dict(self) -> dict: ...


@dataclass(frozen=True)
class CalibrationContext:
    """Everything an image-free rule may look at when it is fitted for one injection.

    Attributes:
        seen_rows: the head's rows ``[N, D + 1]`` (``[W | b]``).
        new_rows: the injector's predicted rows ``[K, D + 1]`` for the classes being injected.
        seen_descriptors: descriptors ``[N, d]`` of the old classes (same embedder and templates as the
            new ones); needed by :class:`SimulatedCalibration`.
        new_descriptors: descriptors ``[K, d]`` of the new classes.
        injector_factory: returns a fresh, unfitted injector configured like the one that predicted
            ``new_rows``; needed by :class:`SimulatedCalibration`.
        seed: seed of the rule's random choices (which classes are held out).
        feature_mean: estimated mean ``[D]`` of the features the head sees
            (:func:`~classifier_injection.features.feature_statistics`), or ``None`` when the model hides it;
            lets a rule set each new bias against it (see :func:`feature_mean_biases`).
        feature_source: how ``feature_mean`` was estimated (recorded in the diagnostics).
        feature_std: per-feature spread ``[D]`` the pooled features would have if the positions before the pool
            were independent (:attr:`~classifier_injection.features.FeatureStatistics.std`), or ``None``; with
            ``feature_mean`` it lets :class:`SynthesizedCalibration` synthesise features.
    """

    seen_rows: torch.Tensor
    new_rows: torch.Tensor
    seen_descriptors: torch.Tensor | None = None
    new_descriptors: torch.Tensor | None = None
    injector_factory: Callable[[], object] | None = None
    seed: int = 0
    feature_mean: torch.Tensor | None = None
    feature_source: str | None = None
    feature_std: torch.Tensor | None = None


@runtime_checkable
class FittableCalibration(Protocol):
    """A rule that must see a :class:`CalibrationContext` first; ``fit`` returns a ready :class:`Calibration`."""

    name: str

    def fit(self, context: CalibrationContext) -> Calibration: ...

    def to_dict(self) -> dict: ...


def _norm_rows(new_rows: torch.Tensor, norm: torch.Tensor | float, bias: torch.Tensor | float) -> torch.Tensor:
    """Rows with weight vectors rescaled to ``norm`` (scalar or ``[K]``) and biases set to ``bias``."""
    new_w = new_rows[:, :-1]
    norm = torch.as_tensor(norm, dtype=new_w.dtype, device=new_w.device)
    new_w = new_w / new_w.norm(dim=1, keepdim=True).clamp_min(1e-12) * norm.reshape(-1, 1)
    new_b = torch.as_tensor(bias, dtype=new_w.dtype, device=new_w.device).expand(len(new_rows))
    return torch.cat([new_w, new_b[:, None]], dim=1)


def feature_mean_biases(new_weights: torch.Tensor, seen_rows: torch.Tensor, feature_mean: torch.Tensor) -> torch.Tensor:
    """Biases ``[K]`` that give each new row the old rows' average logit on the mean feature ``mu``.

    ``b_i = mean_j (w_j . mu + b_j) - w_i . mu``. A row blended from many old rows keeps their common
    component and fires on every image; its bias takes that back, as the old biases did during training.
    Chosen on held-out *old* classes of tf_efficientnet_lite0 (``benchmarks/results/calibration_bias.md``):
    H 31.3 -> 35.0 at the factor ``simulate`` picks, against the plain mean bias.
    """
    mu = feature_mean.to(seen_rows.device, torch.float64)
    weights = seen_rows[:, :-1].double()
    if mu.shape != weights.shape[1:]:
        raise ValueError(f"feature_mean must be [{weights.shape[1]}] (the head's input width), got {tuple(mu.shape)}")
    target = (weights @ mu + seen_rows[:, -1].double()).mean()
    return (target - new_weights.double() @ mu).to(new_weights.dtype)


def _mean_norm(seen_rows: torch.Tensor) -> torch.Tensor:
    return seen_rows[:, :-1].float().norm(dim=1).mean()


def _check_rows(new_rows: torch.Tensor, seen_rows: torch.Tensor) -> None:
    if new_rows.dim() != 2 or seen_rows.dim() != 2 or new_rows.shape[1] != seen_rows.shape[1]:
        raise ValueError(
            f"new_rows and seen_rows must be [K, D + 1] and [N, D + 1] with the same D + 1, got "
            f"{tuple(new_rows.shape)} and {tuple(seen_rows.shape)}"
        )


@dataclass(frozen=True)
class NoCalibration:
    """Keep the rows as predicted (the paper's GZSL setting)."""

    name: str = "none"

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        return new_rows.clone()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class NormCalibration:
    """Rescale each new weight vector to ``factor`` x the mean norm of the old weight vectors.

    The bias of a new row is set to the mean old bias plus ``bias_shift`` (in units of the old biases'
    standard deviation), so new classes start with the prior of a typical old class.

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
        _check_rows(new_rows, seen_rows)
        biases = seen_rows[:, -1]
        std = biases.std() if len(biases) > 1 else biases.new_zeros(())
        return _norm_rows(new_rows, _mean_norm(seen_rows) * self.factor, biases.mean() + self.bias_shift * std)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ScaledCalibration:
    """A fitted rule: weight vectors to ``factor`` x the old rows' mean norm (times ``row_scales`` per row when
    given), biases to ``bias``. Produced by the ``fit`` of the image-free rules; ``diagnostics`` tells why.

    Attributes:
        name: the rule that produced it (``"simulate"``, ``"logit-match"``).
        factor: global norm factor relative to the old rows' mean norm.
        bias: bias of every new row.
        row_scales: optional per-row factors ``[K]`` on top of ``factor``.
        biases: optional per-row biases ``[K]`` replacing ``bias`` (see :func:`feature_mean_biases`).
        diagnostics: JSON-able numbers recorded in provenance (the simulated S/U/H, ...).
    """

    name: str
    factor: float
    bias: float
    row_scales: tuple[float, ...] | None = None
    biases: tuple[float, ...] | None = None
    diagnostics: dict = field(default_factory=dict)

    def _per_row(self, values: tuple[float, ...], new_rows: torch.Tensor) -> torch.Tensor:
        if len(values) != len(new_rows):
            raise ValueError(
                f"this calibration was fitted for {len(values)} new rows, got {len(new_rows)}: "
                "fit it again on the rows to calibrate"
            )
        return torch.tensor(values, dtype=new_rows.dtype, device=new_rows.device)

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        _check_rows(new_rows, seen_rows)
        norm = _mean_norm(seen_rows) * self.factor
        if self.row_scales is not None:
            norm = norm * self._per_row(self.row_scales, new_rows)
        bias = self.bias if self.biases is None else self._per_row(self.biases, new_rows)
        return _norm_rows(new_rows, norm, bias)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("row_scales", "biases"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data


BiasRule = Literal["feature-mean", "mean"]
_BIAS_RULES = ("feature-mean", "mean")


def _check_bias_rule(rule: str) -> None:
    if rule not in _BIAS_RULES:
        raise ValueError(f"bias must be one of {_BIAS_RULES}, got {rule!r}")


def _fitted(
    name: str,
    factor: float,
    bias_rule: BiasRule,
    context: CalibrationContext,
    diagnostics: dict,
    offset: float = 0.0,
):
    """The fitted :class:`ScaledCalibration` of a rule, with its biases chosen by ``bias_rule`` plus ``offset``.

    ``"feature-mean"`` (default) uses :func:`feature_mean_biases` when the context has a feature mean and
    falls back to the old rows' mean bias otherwise; ``"mean"`` always uses the mean old bias.
    """
    seen_rows = context.seen_rows.detach().float().cpu()
    bias = float(seen_rows[:, -1].mean()) + offset
    biases = None
    used = "mean"
    if bias_rule == "feature-mean" and context.feature_mean is not None:
        new_rows = context.new_rows.detach().float().cpu()
        _check_rows(new_rows, seen_rows)
        scaled = _norm_rows(new_rows, _mean_norm(seen_rows) * factor, 0.0)[:, :-1]
        biases = tuple(float(b) + offset for b in feature_mean_biases(scaled, seen_rows, context.feature_mean))
        used = "feature-mean"
    diagnostics = {**diagnostics, "bias_rule": used}
    if used == "feature-mean":
        diagnostics["feature_source"] = context.feature_source
    return ScaledCalibration(name=name, factor=factor, bias=bias, biases=biases, diagnostics=diagnostics)


@dataclass(frozen=True)
class FactorChoice:
    """What a simulation rule chose for a head before it looks at the new rows; JSON-able, so it can be cached.

    The simulation rules (``simulate``, ``budget``, ``synthesize``) look at the old classes only (their rows and
    descriptors, the feature statistics, a fresh injector), so their choice holds for any classes injected into
    the same head with the same injector, descriptors and seed (:class:`~classifier_injection.calibration_cache.
    CalibrationCache` keeps it). :meth:`apply` turns it into the fitted calibration of one injection: the per-row
    biases need the new rows.

    Attributes:
        name: the rule that chose (``"synthesize"``, or ``"simulate"`` when it fell back).
        factor: norm factor (x the old rows' mean norm).
        bias_rule: how the new rows' biases are set (see :func:`_fitted`).
        offset: logits added to every new bias.
        diagnostics: JSON-able provenance of the choice (simulated S/U/H, ...).
    """

    name: str
    factor: float
    bias_rule: BiasRule
    offset: float = 0.0
    diagnostics: dict = field(default_factory=dict)

    def apply(self, context: CalibrationContext) -> ScaledCalibration:
        """The fitted calibration for the new rows of ``context``."""
        return _fitted(self.name, self.factor, self.bias_rule, context, self.diagnostics, self.offset)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FactorChoice:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on anything else (e.g. a damaged cache file)."""
        if not isinstance(data, dict) or set(data) != {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"not a FactorChoice: {data!r:.200}")
        choice = cls(**data)
        valid = (
            isinstance(choice.name, str)
            and isinstance(choice.factor, float)
            and math.isfinite(choice.factor)
            and choice.factor > 0
            and choice.bias_rule in _BIAS_RULES
            and isinstance(choice.offset, int | float)
            and math.isfinite(choice.offset)
            and isinstance(choice.diagnostics, dict)
        )
        if not valid:
            raise ValueError(f"not a valid FactorChoice: {data!r:.200}")
        return choice


def prototype_gzsl_curve(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    factors: Sequence[float],
) -> torch.Tensor:
    """Simulated GZSL accuracies ``[len(factors), 3]`` (S, U, H in %) of an injection of held-out classes.

    The head's rows are split into kept rows and the ``held_out`` ones, whose rows are replaced by
    ``predicted_rows`` (normalised to factor x the kept rows' mean norm). Each class is represented by one
    proxy feature, the direction of its true row (the feature that the head scores highest for the class
    per unit norm; under neural collapse, class means align with the rows). Proxies have no absolute scale,
    so logits are compared without biases. S: kept-class proxies still won by their own row; U: held-out
    proxies won by their predicted row.
    """
    return noisy_prototype_gzsl_curve(seen_rows, held_out, predicted_rows, factors, noise=0.0, samples=1)


def _accuracies(
    wins: torch.Tensor,
    arg_old: torch.Tensor,
    arg_new: torch.Tensor,
    labels: torch.Tensor,
    held_out: torch.Tensor,
    num: int,
) -> torch.Tensor:
    """S, U, H (%) per factor ``[F, 3]`` from ``wins [F, M]`` (a new row out-scores the kept ones on sample ``m``)."""
    held = torch.zeros(num, dtype=torch.bool)
    held[held_out] = True
    own_kept = torch.full((num,), -1, dtype=torch.long)
    own_kept[~held] = torch.arange(int((~held).sum()))
    own_new = torch.full((num,), -1, dtype=torch.long)
    own_new[held_out] = torch.arange(len(held_out))
    is_new = held[labels]
    # Accuracies in float64 before the harmonic mean, returned as float32 (as the rules have always read them).
    s = 100 * ((~wins) & (arg_old == own_kept[labels]))[:, ~is_new].float().mean(1).double()
    u = 100 * (wins & (arg_new == own_new[labels]))[:, is_new].float().mean(1).double()
    h = torch.where(s + u > 0, 2 * s * u / (s + u).clamp_min(1e-12), torch.zeros_like(s))
    return torch.stack([s, u, h], dim=1).float()


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
    """:func:`prototype_gzsl_curve` on ``samples`` noisy prototypes per class (see :func:`proxy_noise`).

    Clean prototypes are won by their own row almost regardless of the new rows' scale (simulated S stays at
    97-100 %); with noise scaled so the old head is imperfect on them, simulated S falls with the factor as
    real old-class accuracy does.
    """
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
    return _accuracies(wins, arg_old, arg_new, labels, held_out, num)


def synthesize_features(
    seen_rows: torch.Tensor,
    feature_mean: torch.Tensor,
    feature_spread: torch.Tensor,
    confidence: float,
    samples: int = 4,
    seed: int = 0,
    max_steps: int = 2000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N * samples, D]`` and labels ``[N * samples]`` synthesised for every class of the head.

    Each starts at ``feature_mean + feature_spread * z`` (``z ~ N(0, I)``: a feature of no class in particular)
    and climbs the head's log-softmax of its class by normalised gradient steps (``w_c - sum_j p_j w_j``, so it
    moves away from the classes the head confuses it with, as trained features do) until the head gives the
    class probability ``confidence``. Step length: 1/250 of the expected norm of the start's spread.
    """
    weights, biases = seen_rows[:, :-1].float(), seen_rows[:, -1].float()
    num, dim = weights.shape
    mean, spread = feature_mean.float().reshape(-1), feature_spread.float().reshape(-1)
    if mean.shape != (dim,) or spread.shape != (dim,):
        raise ValueError(
            f"feature_mean and feature_spread must be [{dim}], got {tuple(mean.shape)}, {tuple(spread.shape)}"
        )
    labels = torch.arange(num).repeat_interleave(samples)
    generator = torch.Generator().manual_seed(seed)
    features = mean + spread * torch.randn(len(labels), dim, generator=generator)
    step = float(spread.norm()) / 250
    active = torch.arange(len(labels))
    for _ in range(max_steps):
        x, own = features[active], labels[active]
        probs = torch.softmax(x @ weights.T + biases, dim=1)
        climbing = probs[torch.arange(len(active)), own] < confidence
        if not climbing.any():
            break
        active, x, own, probs = active[climbing], x[climbing], own[climbing], probs[climbing]
        features[active] = x + step * F.normalize(weights[own] - probs @ weights, dim=1)
    return features, labels


def synthetic_gzsl_curve(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    factors: Sequence[float],
    features: torch.Tensor,
    labels: torch.Tensor,
    feature_mean: torch.Tensor,
    offset: float = 0.0,
) -> torch.Tensor:
    """Simulated GZSL accuracies ``[len(factors), 3]`` (S, U, H in %) on synthesised features, biases included.

    As :func:`prototype_gzsl_curve`, but on features with a real scale (:func:`synthesize_features`): kept rows
    keep their biases, predicted rows get ``factor`` x the kept rows' mean norm and the biases of
    :func:`feature_mean_biases` plus ``offset``, exactly as the real new rows will.
    """
    num = len(seen_rows)
    held = torch.zeros(num, dtype=torch.bool)
    held[held_out] = True
    kept = seen_rows[~held].float()
    mean = feature_mean.float()
    # At factor f a new row's logit is target + offset + f * n * (u_i . (x - mu)) (u_i its unit direction, n the
    # kept rows' mean norm): the best new row does not depend on f, only its margin does.
    target = float((kept[:, :-1] @ mean + kept[:, -1]).mean())
    units = F.normalize(predicted_rows[:, :-1].float(), dim=1) * kept[:, :-1].norm(dim=1).mean()
    best_old, arg_old = (features @ kept[:, :-1].T + kept[:, -1]).max(dim=1)
    best_new, arg_new = ((features - mean) @ units.T).max(dim=1)
    factor = torch.tensor(list(factors), dtype=torch.float32)[:, None]
    wins = target + offset + factor * best_new[None] > best_old[None]
    return _accuracies(wins, arg_old, arg_new, labels, held_out, num)


def _num_held(holdout_fraction: float, num: int) -> int:
    return min(max(1, round(holdout_fraction * num)), num - 2)


def simulate_injections(
    context: CalibrationContext, holdout_fraction: float, repeats: int, rule: str = "simulate"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inject some of the model's own classes: ``repeats`` x ``(held-out class indices, their predicted rows)``.

    Each repeat holds out ``holdout_fraction`` of the old classes at random (seeded by ``context.seed``), trains a
    fresh ``context.injector_factory()`` on the others with the same descriptors and predicts the held-out rows.
    """
    seen_rows, descriptors = context.seen_rows.detach().float().cpu(), context.seen_descriptors
    if descriptors is None or context.injector_factory is None:
        raise ValueError(
            f"the {rule!r} calibration needs context.seen_descriptors and context.injector_factory to "
            "re-run the injection on held-out old classes; pass them, or use calibration='logit-match'"
        )
    descriptors = descriptors.detach().float().cpu()
    if len(descriptors) != len(seen_rows):
        raise ValueError(
            f"context.seen_descriptors has {len(descriptors)} rows but the head has {len(seen_rows)} classes"
        )
    num, num_held = len(seen_rows), _num_held(holdout_fraction, len(seen_rows))
    if num_held < 1:
        raise ValueError(f"the {rule!r} calibration needs a head with at least 3 classes, this one has {num}")
    generator = torch.Generator().manual_seed(context.seed)
    out = []
    for repeat in range(repeats):
        perm = torch.randperm(num, generator=generator)
        held, kept = perm[:num_held].sort().values, perm[num_held:].sort().values
        injector = context.injector_factory()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed + repeat)
            injector.fit(descriptors[kept], seen_rows[kept], descriptors[held])
        out.append((held, injector.predict(descriptors[held]).detach().float().cpu()))
    return out


def _check_simulation_rule(rule) -> None:
    """Checks shared by the rules that simulate an injection (:func:`simulate_injections`)."""
    if not 0 < rule.holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {rule.holdout_fraction}")
    if rule.repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {rule.repeats}")
    if not rule.factors or any(not (math.isfinite(f) and f > 0) for f in rule.factors):
        raise ValueError(f"factors must be a non-empty sequence of finite numbers > 0, got {rule.factors}")
    _check_bias_rule(rule.bias)


def _largest_keeping(curve: torch.Tensor, factors: Sequence[float], min_seen: float) -> int:
    """Index of the largest factor whose simulated S is at least ``min_seen`` (the smallest factor when none is)."""
    order = sorted(range(len(factors)), key=lambda i: factors[i])
    return max((i for i in order if curve[i, 0] >= min_seen), key=lambda i: factors[i], default=order[0])


def _largest_within_budget(curve: torch.Tensor, factors: Sequence[float], max_seen_drop: float) -> int:
    """Index of the largest factor whose simulated S is at most ``max_seen_drop`` below S at the smallest factor."""
    smallest = min(range(len(factors)), key=lambda i: factors[i])
    return _largest_keeping(curve, factors, float(curve[smallest, 0]) - max_seen_drop)


def _raise_unfitted(rule) -> None:
    raise RuntimeError(
        f"{type(rule).__name__} must be fitted first: call .fit(CalibrationContext(...)) and use the result "
        "(inject() does this for you)"
    )


def _simulation_diagnostics(rule, context: CalibrationContext, chosen: torch.Tensor, **extra) -> dict:
    """Provenance of a simulation rule's choice: the simulated S, U, H (%) at the chosen factor, and ``extra``."""
    seen_rows = context.seen_rows.detach().float()
    s, u, h = (round(float(v), 2) for v in chosen)
    return {
        "old_mean_norm": round(float(_mean_norm(seen_rows)), 6),
        "held_out_classes": _num_held(rule.holdout_fraction, len(seen_rows)),
        "repeats": rule.repeats,
        **extra,
        "simulated_S": s,
        "simulated_U": u,
        "simulated_H": h,
    }


@dataclass(frozen=True)
class SimulatedCalibration:
    """Leave-classes-out simulation: pick the norm factor that works for the model's own classes.

    ``repeats`` times: hold out ``holdout_fraction`` of the old classes at random, train a fresh injector
    (``context.injector_factory()``) on the others with the same descriptors, predict the held-out rows,
    and score every factor in ``factors`` by the harmonic mean of simulated seen/unseen accuracy on
    prototype proxy features (:func:`prototype_gzsl_curve`). H is flat around its maximum while old-class
    accuracy keeps falling as the factor grows, so the rule takes the *smallest* factor whose mean simulated
    H is within ``tolerance`` (relative) of the best one. That factor is applied to the real new rows;
    their biases follow ``bias``. Costs ``repeats`` extra injector fits.

    Attributes:
        holdout_fraction: share of old classes held out per repeat (0.2 mirrors 200 new classes on 800).
        repeats: number of random hold-outs whose curves are averaged. Two narrow the spread of the chosen
            factor (seen-class validation on lite0: s.d. 0.027 vs 0.039 at ``tolerance=0.1``) at the cost of one
            more injector fit; the default stays one.
        factors: candidate norm factors (x the old rows' mean norm).
        tolerance: accept factors whose simulated H is at least ``(1 - tolerance)`` x the best; ``0`` takes
            the best H itself. The default 0.1 was chosen on held-out *seen* classes of lite0 with the library
            defaults (``benchmarks/calibration.py``): the largest tolerance whose H stays within 10 % of the H of
            the best factor picked on those seen photos (H 39.8 vs 43.4, S drop 16.4; 0.125: 38.5, 14.7).
        bias: ``"feature-mean"`` (per-row biases against the model's mean feature when it can be estimated,
            :func:`feature_mean_biases`) or ``"mean"`` (every new row gets the old rows' mean bias).
    """

    holdout_fraction: float = 0.2
    repeats: int = 1
    factors: tuple[float, ...] = DEFAULT_FACTORS
    tolerance: float = 0.1
    bias: BiasRule = "feature-mean"
    name: str = "simulate"

    def __post_init__(self) -> None:
        _check_simulation_rule(self)
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        _raise_unfitted(self)

    def simulated_curve(
        self, context: CalibrationContext, injections: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    ) -> torch.Tensor:
        """Mean simulated ``[len(factors), 3]`` (S, U, H in %) over the repeats: the expensive part of :meth:`fit`.

        ``injections`` (from :func:`simulate_injections` on the same context) skips the injector refits.
        """
        seen_rows = context.seen_rows.detach().float().cpu()
        if injections is None:
            injections = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)
        return torch.stack([prototype_gzsl_curve(seen_rows, h, p, self.factors) for h, p in injections]).mean(0)

    def choose(self, curve: torch.Tensor) -> int:
        """Index into ``factors`` of the smallest factor whose simulated H is within ``tolerance`` of the best."""
        top = float(curve[:, 2].max())
        order = sorted(range(len(self.factors)), key=lambda i: self.factors[i])
        return next(i for i in order if curve[i, 2] >= (1 - self.tolerance) * top)

    def select(self, context: CalibrationContext, curve: torch.Tensor | None = None) -> FactorChoice:
        """The choice on ``context``'s old classes; ``curve`` (from :meth:`simulated_curve`) skips the simulation."""
        curve = self.simulated_curve(context) if curve is None else curve
        best = self.choose(curve)
        factor = float(self.factors[best])
        diagnostics = _simulation_diagnostics(self, context, curve[best])
        _logger.info("simulate calibration: factor %.3f (%s)", factor, diagnostics)
        return FactorChoice(self.name, factor, self.bias, 0.0, diagnostics)

    def fit(self, context: CalibrationContext, curve: torch.Tensor | None = None) -> ScaledCalibration:
        """Fit on ``context``; ``curve`` (from :meth:`simulated_curve` on the same context) skips the simulation."""
        return self.select(context, curve).apply(context)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BudgetCalibration:
    """Leave-classes-out simulation with an old-class budget: the largest factor that keeps old classes safe.

    Like :class:`SimulatedCalibration` (same simulated injection of held-out old classes), but the proxy
    features are *noisy* prototypes, with the noise set so that the head scores ``proxy_accuracy`` on its own
    (:func:`proxy_noise`), and the rule takes the largest factor whose simulated old-class accuracy is at most
    ``max_seen_drop`` points below its value at the smallest factor. Simulated S then falls with the factor as
    the real one does: on held-out *seen* classes of lite0 the chosen factor's spread across folds was 0.012
    (``simulate``: 0.039), and with ICIS rows it beat ``simulate`` on lite0/1/2 (module docstring). Opt-in
    (``calibration="budget"``): the budget was set with ICIS rows, and blurrier rows (ridge) spend it at a much
    smaller scale (lite0 H ~11 vs ~30 with ``simulate``; ``benchmarks/results/calibration_notes.md``).

    Attributes:
        holdout_fraction: share of old classes held out per repeat.
        repeats: number of random hold-outs whose curves are averaged.
        factors: candidate norm factors (x the old rows' mean norm).
        proxy_accuracy: the head's top-1 on its own noisy prototypes (sets the noise).
        max_seen_drop: allowed fall of simulated old-class accuracy, in points. 6 (with ``proxy_accuracy``
            0.9) was chosen on held-out *seen* classes of lite0: the most H whose real S drop there stayed
            within 15 points (14.2).
        samples: noisy prototypes per class.
        bias: ``"feature-mean"`` or ``"mean"``, as for :class:`SimulatedCalibration`.
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
        _check_simulation_rule(self)
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if not 0 < self.proxy_accuracy < 1:
            raise ValueError(f"proxy_accuracy must be in (0, 1), got {self.proxy_accuracy}")
        if not (math.isfinite(self.max_seen_drop) and self.max_seen_drop >= 0):
            raise ValueError(f"max_seen_drop must be a finite number >= 0, got {self.max_seen_drop}")

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        _raise_unfitted(self)

    def fit(self, context: CalibrationContext) -> ScaledCalibration:
        return self.select(context).apply(context)

    def select(self, context: CalibrationContext) -> FactorChoice:
        """The choice on ``context``'s old classes (see :class:`FactorChoice`)."""
        seen_rows = context.seen_rows.detach().float().cpu()
        injections = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)
        noise = proxy_noise(seen_rows, self.proxy_accuracy, self.samples, context.seed)
        curve = torch.stack(
            [
                noisy_prototype_gzsl_curve(seen_rows, held, predicted, self.factors, noise, self.samples, context.seed)
                for held, predicted in injections
            ]
        ).mean(0)
        best = _largest_within_budget(curve, self.factors, self.max_seen_drop)
        diagnostics = _simulation_diagnostics(self, context, curve[best], proxy_noise=round(noise, 6))
        return FactorChoice(self.name, float(self.factors[best]), self.bias, 0.0, diagnostics)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SynthesizedCalibration:
    """Leave-classes-out simulation on features synthesised from the model's own statistics (the default).

    The simulated injection of :class:`SimulatedCalibration` (hold out ``holdout_fraction`` of the old classes,
    refit a fresh injector on the rest, predict the held-out rows), scored on features with a real scale instead
    of row directions: ``samples`` per old class, started at the estimated feature mean plus noise of the
    estimated spread (``spread`` x :attr:`CalibrationContext.feature_std`) and pushed up the head's log-softmax
    until it gives the class probability ``confidence`` (:func:`synthesize_features`). Kept rows keep their
    biases and new rows get the feature-mean biases they will really get, plus ``offset`` logits
    (:func:`synthetic_gzsl_curve`). The rule takes the largest factor whose simulated old-class accuracy falls at
    most ``max_seen_drop`` points, or the floor set by ``floor_tolerance`` when that is larger.

    The offset is a prior for the new classes, as in calibrated stacking: a photo of a new class leaves the
    old head unsure, and a constant boost lets a new row win exactly there, while a smaller norm factor keeps
    the new rows from out-scoring confident old ones. On real heads this reaches a higher H at the same S
    drop than any norm factor alone (``benchmarks/results/calibration_notes.md``).

    Why: the row-direction proxy of ``simulate`` is won by its own row at every factor that matters, so it cannot
    see what a factor costs the old classes; isotropic noise (``budget``) sees it, but charges blurry rows
    (ridge) for noise real features do not have. Synthesised features are pushed away from the rows they could
    be confused with, as trained features are: on held-out *seen* classes of lite0, 2.5 simulated points cost a
    real S drop of 13.3 with ICIS rows and 15.2 with ridge rows (``benchmarks/results/calibration_notes.md``).

    Needs ``feature_mean`` and ``feature_std`` in the context (a BatchNorm before global pooling,
    :func:`~classifier_injection.features.feature_statistics`); without them it falls back to
    :class:`SimulatedCalibration` and says so in the diagnostics.

    Attributes:
        holdout_fraction: share of old classes held out per repeat.
        repeats: number of random hold-outs whose curves are averaged.
        factors: candidate norm factors (x the old rows' mean norm).
        spread: pooled spread over the independent-positions spread; 3.8 is the ratio of lite0's photo
            features (seen classes; lite1 3.7, lite2 4.0 measured, not used).
        confidence: class probability at which a synthesised feature stops climbing.
        max_seen_drop: allowed fall of simulated old-class accuracy, in points.
        samples: synthesised features per old class.
        floor_tolerance: when set, the factor is at least the one :class:`SimulatedCalibration` with this
            tolerance picks from the same simulated injections (no extra fit); with an offset, that floor factor is
            first carried over to the factor whose simulated old-class accuracy *with* the offset equals the
            floor's *without* it (same features, same injections). The synthetic budget over-charges rows
            predicted from weak descriptors (lite0, bare "a photo of a {name}." prompts, ICIS, 5 folds: budget
            alone H 18.7 at S drop 6.1; with the floor 24.2 at 14.9); with the default descriptors the floor
            never binds on lite0/1/2 (ICIS and ridge rows). ``None``: the budget alone.
        offset: logits added to every new row's feature-mean bias (a prior for the new classes); ``0`` gives
            the previous default (with ``max_seen_drop=2.5``).

    ``spread``, ``confidence`` and ``max_seen_drop`` were chosen on held-out *seen* classes of lite0 with the
    default injector (``python -m benchmarks.calibration --tune-synthesize``): the largest budget whose real
    inner S drop plus its standard error over the folds stays within 15 points (offset 1: 4.0 gives 12.4 + 0.6,
    5.0 gives 14.7 + 0.8). Offsets 2 and 3 reach a higher inner H, but at their budgets the S drop on lite1's
    test folds exceeds 15 (16.5, 22.2): the offset was chosen with that in view
    (``benchmarks/results/calibration_notes.md``).
    """

    holdout_fraction: float = 0.2
    repeats: int = 1
    factors: tuple[float, ...] = DEFAULT_FACTORS
    spread: float = 3.8
    confidence: float = 0.3
    max_seen_drop: float = 4.0
    samples: int = 4
    floor_tolerance: float | None = 0.1
    offset: float = 1.0
    name: str = "synthesize"

    def __post_init__(self) -> None:
        _check_simulation_rule(self)
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
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
        _raise_unfitted(self)

    def synthesized_features(self, context: CalibrationContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and labels this rule scores on (:func:`synthesize_features` with its spread and confidence)."""
        if context.feature_mean is None or context.feature_std is None:
            raise ValueError(f"the {self.name!r} calibration needs context.feature_mean and context.feature_std")
        seen_rows = context.seen_rows.detach().float().cpu()
        mean = context.feature_mean.detach().float().cpu()
        spread = self.spread * context.feature_std.detach().float().cpu()
        return synthesize_features(seen_rows, mean, spread, self.confidence, self.samples, context.seed)

    def simulated_curve(
        self,
        context: CalibrationContext,
        injections: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean simulated ``[len(factors), 3]`` (S, U, H in %) on synthesised features over the repeats.

        ``injections`` (from :func:`simulate_injections` on the same context) skips the injector refits;
        ``features`` (from :meth:`synthesized_features` of a rule with the same spread and confidence) skips the
        synthesis, e.g. to compare offsets on the same features.
        """
        features, labels = self.synthesized_features(context) if features is None else features
        seen_rows = context.seen_rows.detach().float().cpu()
        mean = context.feature_mean.detach().float().cpu()
        if injections is None:
            injections = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)
        return torch.stack(
            [
                synthetic_gzsl_curve(seen_rows, h, p, self.factors, features, labels, mean, self.offset)
                for h, p in injections
            ]
        ).mean(0)

    def _floor(self) -> SimulatedCalibration | None:
        if self.floor_tolerance is None:
            return None
        return SimulatedCalibration(self.holdout_fraction, self.repeats, self.factors, self.floor_tolerance)

    def fit(self, context: CalibrationContext) -> ScaledCalibration:
        """Fit on ``context`` (``select(context, ...).apply(context)`` reuses a simulation)."""
        return self.select(context).apply(context)

    def select(
        self,
        context: CalibrationContext,
        curve: torch.Tensor | None = None,
        floor_curve: torch.Tensor | None = None,
        *,
        injections: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> FactorChoice:
        """The choice on ``context``'s old classes (see :class:`FactorChoice`).

        ``curve`` (from :meth:`simulated_curve`) and ``floor_curve`` (the prototype curve of
        :meth:`SimulatedCalibration.simulated_curve`, needed when ``floor_tolerance`` is set) skip the simulation;
        ``injections`` and ``features`` (as for :meth:`simulated_curve`) skip its two expensive parts, e.g. to fit
        rules that differ only in offset or budget on one simulation.
        """
        floor = self._floor()
        if curve is None and (context.feature_mean is None or context.feature_std is None):
            choice = SimulatedCalibration(self.holdout_fraction, self.repeats, self.factors).select(context)
            _logger.info("synthesize calibration: no feature statistics, fell back to simulate")
            return dataclasses.replace(choice, diagnostics={**choice.diagnostics, "fallback_from": self.name})
        # With an offset the floor is carried over through a curve without it, on the same features and injections.
        translate_floor = floor is not None and self.offset != 0
        needs_injections = curve is None or (floor is not None and floor_curve is None) or translate_floor
        if injections is None and needs_injections:
            injections = simulate_injections(context, self.holdout_fraction, self.repeats, self.name)
        if features is None and (curve is None or translate_floor):
            features = self.synthesized_features(context)
        if curve is None:
            curve = self.simulated_curve(context, injections, features)
        best = _largest_within_budget(curve, self.factors, self.max_seen_drop)
        extra = {"synthesized_features": self.samples * len(context.seen_rows), "budget_factor": self.factors[best]}
        if floor is not None:
            if floor_curve is None:
                floor_curve = floor.simulated_curve(context, injections)
            floor_index = floor.choose(floor_curve)
            extra["floor_factor"] = self.factors[floor_index]
            if translate_floor:
                without_offset = dataclasses.replace(self, offset=0.0, floor_tolerance=None)
                reference = without_offset.simulated_curve(context, injections, features)
                # The factor that costs the simulated old classes as much with the offset as the floor does without.
                floor_index = _largest_keeping(curve, self.factors, float(reference[floor_index, 0]))
                extra["floor_factor_with_offset"] = self.factors[floor_index]
            if self.factors[floor_index] > self.factors[best]:
                best = floor_index
        diagnostics = _simulation_diagnostics(self, context, curve[best], offset=self.offset, **extra)
        _logger.info("synthesize calibration: factor %.3f (%s)", self.factors[best], diagnostics)
        return FactorChoice(self.name, float(self.factors[best]), "feature-mean", self.offset, diagnostics)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LogitMatchCalibration:
    """Match the logits that new rows produce on prototype features to those of the old rows; no refit.

    Proxy features are the old rows' directions (one per old class). For an old row ``j``, the mean of its
    ``top_k`` largest logits on the prototypes of the *other* classes is how strongly it responds to its
    nearest confusable classes. The new rows get one common norm factor, chosen so that their median
    ``top_k`` response on the old prototypes is ``margin`` x the old rows' median: new rows predicted from
    text respond to many old classes at once (they sit between them), and must out-score those neighbours
    by a margin to ever win. Biases are set to the mean old bias. ``margin`` is the rule's one constant,
    chosen on held-out *old* classes (``benchmarks/calibration.py``); a common factor keeps the relative
    norms the injector predicted.

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
        _check_bias_rule(self.bias)

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        return self.fit(CalibrationContext(seen_rows=seen_rows, new_rows=new_rows))(new_rows, seen_rows)

    def fit(self, context: CalibrationContext) -> ScaledCalibration:
        seen_rows = context.seen_rows.detach().float().cpu()
        new_rows = context.new_rows.detach().float().cpu()
        _check_rows(new_rows, seen_rows)
        num = len(seen_rows)
        if num < 2:
            raise ValueError(f"the 'logit-match' calibration needs a head with at least 2 classes, this one has {num}")
        k = min(self.top_k, num - 1)
        weights = seen_rows[:, :-1]
        proxies = F.normalize(weights, dim=1)
        old = weights @ proxies.T  # [N, N]: row j's logit on class c's prototype
        old.fill_diagonal_(-math.inf)
        target = old.topk(k, dim=1).values.mean(dim=1).median()
        unit_new = F.normalize(new_rows[:, :-1], dim=1) * _mean_norm(seen_rows)
        response = (unit_new @ proxies.T).topk(k, dim=1).values.mean(dim=1).median()  # at factor 1
        # Rows orthogonal to (or opposite) every old class leave nothing to match: fall back to norm matching.
        factor = float(self.margin * target / response) if response > 0 and target > 0 else 1.0
        diagnostics = {
            "old_mean_norm": round(float(_mean_norm(seen_rows)), 6),
            "old_neighbourhood_logit": round(float(target), 4),
            "new_neighbourhood_logit": round(float(response), 4),
        }
        return _fitted(self.name, factor, self.bias, context, diagnostics)

    def to_dict(self) -> dict:
        return asdict(self)


def check_new_class_scale(scale: float) -> float:
    """Validate the trade-off knob ``new_class_scale`` (see :func:`apply_new_class_scale`)."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"new_class_scale must be a finite number > 0 (1 = the calibration's balance, > 1 favours the new "
            f"classes, < 1 the old ones), got {scale!r}"
        )
    return float(scale)


def apply_new_class_scale(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply calibrated new rows (weights and biases, hence their logits) by ``scale``.

    The user's trade-off knob: ``scale > 1`` makes new classes win more often (higher recall on them, lower
    accuracy on the old classes), ``scale < 1`` protects the old classes. ``1`` keeps the rule's balance.
    The S/U curve it traces on a real head is in ``benchmarks/results/calibration_tradeoff.png``.
    """
    return rows * check_new_class_scale(scale)


_REGISTRY: dict[str, Callable[[], Calibration | FittableCalibration]] = {
    "none": NoCalibration,
    "norm": NormCalibration,
    "simulate": SimulatedCalibration,
    "logit-match": LogitMatchCalibration,
    "budget": BudgetCalibration,
    "synthesize": SynthesizedCalibration,
}


def default_calibration() -> Calibration | FittableCalibration:
    """The library default: the leave-classes-out simulation on synthesised features (see the module doc).

    Models that hide their feature statistics fall back to the row-prototype simulation (``simulate``).
    """
    return SynthesizedCalibration()


def get_calibration(calibration: str | Calibration | FittableCalibration | None) -> Calibration | FittableCalibration:
    """Resolve a name (``"synthesize"``, ``"simulate"``, ``"budget"``, ``"logit-match"``, ``"norm"``, ``"none"``)
    or an instance.

    ``None`` gives the library default (:func:`default_calibration`). A returned object with a ``fit``
    method must be fitted on a :class:`CalibrationContext` before it is called.
    """
    if calibration is None:
        return default_calibration()
    if isinstance(calibration, str):
        if calibration not in _REGISTRY:
            raise ValueError(f"unknown calibration {calibration!r}; choose one of {sorted(_REGISTRY)}")
        return _REGISTRY[calibration]()
    if not isinstance(calibration, Calibration | FittableCalibration):
        raise TypeError(
            f"calibration must be a name ({sorted(_REGISTRY)}) or a Calibration, got {type(calibration).__name__}"
        )
    return calibration


def fit_calibration(
    calibration: Calibration | FittableCalibration, context: CalibrationContext, cache: ChoiceStore | None = None
) -> Calibration:
    """``calibration.fit(context)`` for rules that need fitting, the calibration itself otherwise.

    ``cache`` (a :class:`~classifier_injection.calibration_cache.CalibrationCache`) keeps the choice of the rules
    that make it from the old classes alone (those with a ``select`` method, see :class:`FactorChoice`).
    """
    fit = getattr(calibration, "fit", None)
    if not callable(fit):
        return calibration
    if cache is not None and callable(getattr(calibration, "select", None)):
        return cache.select(calibration, context).apply(context)
    return fit(context)


class ChoiceStore(Protocol):
    """Where :func:`fit_calibration` keeps the choices of the simulation rules (``CalibrationCache``)."""

    def select(self, rule: object, context: CalibrationContext) -> FactorChoice: ...


def copying_factory(injector: object) -> Callable[[], object]:
    """A factory of fresh injectors configured like ``injector``: deep copies of it taken now."""
    template = copy.deepcopy(injector)
    return lambda: copy.deepcopy(template)
