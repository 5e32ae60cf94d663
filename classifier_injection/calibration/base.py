"""Calibration basics: the rule protocols, what a rule may look at, fitted rules, and the registry of names.

A calibration maps predicted rows ``[K, D + 1]`` to rows at a scale and bias where they can win against the
old ones. Rules that need more than the rows first get a :class:`CalibrationContext` through ``fit(context)``
and return a fitted :class:`ScaledCalibration`. No rule ever sees a photo.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch

__all__ = [
    "BiasRule",
    "Calibration",
    "CalibrationContext",
    "ChoiceStore",
    "FactorChoice",
    "FittableCalibration",
    "ScaledCalibration",
    "apply_new_class_scale",
    "check_new_class_scale",
    "default_calibration",
    "feature_mean_biases",
    "fit_calibration",
    "get_calibration",
    "register_calibration",
    "rule_from_dict",
]

BiasRule = Literal["feature-mean", "mean"]
BIAS_RULES = ("feature-mean", "mean")
DEFAULT_RULE = "synthesize"


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

    Work that depends on the context alone (simulated injections, synthesised features) is kept in it, so rules
    fitted on one context share it.

    Attributes:
        seen_rows: the head's rows ``[N, D + 1]`` (``[W | b]``).
        new_rows: the injector's predicted rows ``[K, D + 1]``.
        seen_descriptors: descriptors ``[N, d]`` of the old classes (needed by the simulation rules).
        new_descriptors: descriptors ``[K, d]`` of the new classes.
        injector_factory: returns a fresh, unfitted injector configured like the one that predicted ``new_rows``.
        fitted_injector: returns the injector that predicted ``new_rows``, fitted on these seen rows and both
            descriptor matrices (fitting it then if its rows came from a cache). When given, the simulation injects
            held-out classes with its ``predict_left_out`` instead of refitting a fresh injector: one fit, not two.
        seen_index: positions of ``seen_rows`` among the rows ``fitted_injector`` was fitted on (``None``: the
            same rows; set for the subset a large head is simulated on).
        seed: seed of the rule's random choices.
        feature_mean: estimated mean ``[D]`` of the features the head sees, or ``None``.
        feature_source: how ``feature_mean`` was estimated (recorded in the diagnostics).
        feature_std: per-feature spread ``[D]`` of the pooled features, or ``None``.
    """

    seen_rows: torch.Tensor
    new_rows: torch.Tensor
    seen_descriptors: torch.Tensor | None = None
    new_descriptors: torch.Tensor | None = None
    injector_factory: Callable[[], object] | None = None
    fitted_injector: Callable[[], object] | None = None
    seen_index: torch.Tensor | None = None
    seed: int = 0
    feature_mean: torch.Tensor | None = None
    feature_source: str | None = None
    feature_std: torch.Tensor | None = None
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def memoized(self, key: tuple, compute: Callable[[], object]) -> object:
        """``compute()``, computed once per ``key`` for this context."""
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]


@runtime_checkable
class FittableCalibration(Protocol):
    """A rule that must see a :class:`CalibrationContext` first; ``fit`` returns a ready :class:`Calibration`."""

    name: str

    def fit(self, context: CalibrationContext) -> Calibration: ...

    def to_dict(self) -> dict: ...


def norm_rows(new_rows: torch.Tensor, norm: torch.Tensor | float, bias: torch.Tensor | float) -> torch.Tensor:
    """Rows with weight vectors rescaled to ``norm`` (scalar or ``[K]``) and biases set to ``bias``."""
    new_w = new_rows[:, :-1]
    norm = torch.as_tensor(norm, dtype=new_w.dtype, device=new_w.device)
    new_w = (new_w / new_w.norm(dim=1, keepdim=True).clamp_min(1e-12)).mul_(norm.reshape(-1, 1))
    new_b = torch.as_tensor(bias, dtype=new_w.dtype, device=new_w.device).expand(len(new_rows))
    return torch.cat([new_w, new_b[:, None]], dim=1)


def feature_mean_biases(new_weights: torch.Tensor, seen_rows: torch.Tensor, feature_mean: torch.Tensor) -> torch.Tensor:
    """Biases ``[K]`` that give each new row the old rows' average logit on the mean feature ``mu``.

    ``b_i = mean_j (w_j . mu + b_j) - w_i . mu``. A row blended from many old rows keeps their common
    component and fires on every image; its bias takes that back, as the old biases did during training.
    """
    mu = feature_mean.to(seen_rows.device, torch.float64)
    width = seen_rows.shape[1] - 1
    if mu.shape != (width,):
        raise ValueError(f"feature_mean must be [{width}] (the head's input width), got {tuple(mu.shape)}")
    # In blocks of rows: the whole head in float64 would weigh twice the head.
    logits = torch.cat([block[:, :-1].double() @ mu + block[:, -1].double() for block in seen_rows.split(_BLOCK)])
    return (logits.mean() - new_weights.double() @ mu).to(new_weights.dtype)


#: Rows converted to float64 at a time.
_BLOCK = 2048


def mean_norm(seen_rows: torch.Tensor) -> torch.Tensor:
    return seen_rows[:, :-1].float().norm(dim=1).mean()


def check_rows(new_rows: torch.Tensor, seen_rows: torch.Tensor) -> None:
    if new_rows.dim() != 2 or seen_rows.dim() != 2 or new_rows.shape[1] != seen_rows.shape[1]:
        raise ValueError(
            f"new_rows and seen_rows must be [K, D + 1] and [N, D + 1] with the same D + 1, got "
            f"{tuple(new_rows.shape)} and {tuple(seen_rows.shape)}"
        )


@dataclass(frozen=True)
class ScaledCalibration:
    """A fitted rule: weight vectors to ``factor`` x the old rows' mean norm (times ``row_scales`` per row when
    given), biases to ``bias``. Produced by the ``fit`` of the image-free rules; ``diagnostics`` tells why.

    Attributes:
        name: the rule that produced it.
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
        check_rows(new_rows, seen_rows)
        norm = mean_norm(seen_rows) * self.factor
        if self.row_scales is not None:
            norm = norm * self._per_row(self.row_scales, new_rows)
        bias = self.bias if self.biases is None else self._per_row(self.biases, new_rows)
        return norm_rows(new_rows, norm, bias)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("row_scales", "biases"):
            data[key] = list(data[key]) if data[key] is not None else None
        return data


def check_bias_rule(rule: str) -> None:
    """Raise ``ValueError`` unless ``rule`` is one of :data:`BIAS_RULES`."""
    if rule not in BIAS_RULES:
        raise ValueError(f"bias must be one of {BIAS_RULES}, got {rule!r}")


def fitted(
    name: str,
    factor: float,
    bias_rule: BiasRule,
    context: CalibrationContext,
    diagnostics: dict,
    offset: float = 0.0,
) -> ScaledCalibration:
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
        check_rows(new_rows, seen_rows)
        norm = mean_norm(seen_rows) * factor
        # A block at a time: a scaled copy of thousands of new rows would hold them twice.
        scaled = (norm_rows(block, norm, 0.0)[:, :-1] for block in new_rows.split(_BLOCK))
        new_biases = torch.cat([feature_mean_biases(s, seen_rows, context.feature_mean) for s in scaled])
        biases = tuple(float(b) + offset for b in new_biases)
        used = "feature-mean"
    diagnostics = {**diagnostics, "bias_rule": used}
    if used == "feature-mean":
        diagnostics["feature_source"] = context.feature_source
    return ScaledCalibration(name=name, factor=factor, bias=bias, biases=biases, diagnostics=diagnostics)


@dataclass(frozen=True)
class FactorChoice:
    """What a simulation rule chose for a head before it looks at the new rows; JSON-able, so it can be cached.

    The simulation rules look at the old classes only, so their choice holds for any classes injected into the
    same head with the same injector, descriptors and seed. :meth:`apply` turns it into the fitted calibration of
    one injection: the per-row biases need the new rows.

    Attributes:
        name: the rule that chose (``"synthesize"``, or ``"simulate"`` when it fell back).
        factor: norm factor (x the old rows' mean norm).
        bias_rule: how the new rows' biases are set (see :func:`fitted`).
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
        return fitted(self.name, self.factor, self.bias_rule, context, self.diagnostics, self.offset)

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
            and choice.bias_rule in BIAS_RULES
            and isinstance(choice.offset, int | float)
            and math.isfinite(choice.offset)
            and isinstance(choice.diagnostics, dict)
        )
        if not valid:
            raise ValueError(f"not a valid FactorChoice: {data!r:.200}")
        return choice


def raise_unfitted(rule: object) -> None:
    """The error of a rule called before it was fitted."""
    raise RuntimeError(
        f"{type(rule).__name__} must be fitted first: call .fit(CalibrationContext(...)) and use the result "
        "(inject() does this for you)"
    )


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
    """
    return rows * check_new_class_scale(scale)


_REGISTRY: dict[str, Callable[[], Calibration | FittableCalibration]] = {}


def register_calibration(name: str) -> Callable[[type], type]:
    """Class decorator: make a rule available by ``name`` to :func:`get_calibration`."""

    def register(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return register


def default_calibration() -> Calibration | FittableCalibration:
    """The library default rule (``"synthesize"``)."""
    return _REGISTRY[DEFAULT_RULE]()


def get_calibration(calibration: str | Calibration | FittableCalibration | None) -> Calibration | FittableCalibration:
    """Resolve a registered name or an instance; ``None`` gives :func:`default_calibration`."""
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


class ChoiceStore(Protocol):
    """Where :func:`fit_calibration` keeps the choices of the simulation rules (``CalibrationCache``)."""

    def select(self, rule: object, context: CalibrationContext) -> FactorChoice: ...


def fit_calibration(
    calibration: Calibration | FittableCalibration, context: CalibrationContext, cache: ChoiceStore | None = None
) -> Calibration:
    """``calibration.fit(context)`` for rules that need fitting, the calibration itself otherwise.

    ``cache`` keeps the choices of rules that make them from the old classes alone (those with ``select``).
    """
    fit = getattr(calibration, "fit", None)
    if not callable(fit):
        return calibration
    if cache is not None and callable(getattr(calibration, "select", None)):
        return cache.select(calibration, context).apply(context)
    return fit(context)


def rule_from_dict(data: dict) -> Calibration | FittableCalibration:
    """Rebuild a registered rule from its ``to_dict()`` (sequences come back as tuples)."""
    if not isinstance(data, dict) or data.get("name") not in _REGISTRY:
        raise ValueError(f"not a registered calibration rule: {data!r:.200}; registered: {sorted(_REGISTRY)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return _REGISTRY[data["name"]](**kwargs)
