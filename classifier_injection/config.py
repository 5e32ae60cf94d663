"""``InjectionConfig``: the method's knobs for :func:`~classifier_injection.inject`, in one serialisable object."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from .calibration import (
    Calibration,
    FittableCalibration,
    SynthesizedCalibration,
    check_new_class_scale,
    get_calibration,
)
from .calibration.base import rule_from_dict
from .descriptors import DescriptorConfig
from .icis import ICISConfig

__all__ = ["InjectionConfig"]


@dataclass(frozen=True)
class InjectionConfig:
    """How :func:`~classifier_injection.inject` describes, predicts and calibrates new classes.

    Attributes:
        descriptors: how classes become texts; ``None``: the embedder's default (:class:`DescriptorConfig`).
        icis: settings of the default ICIS injector; ``None``: :class:`ICISConfig` defaults. Not combinable with
            an ``injector`` passed to ``inject`` (configure that injector instead).
        calibration: a rule name (``"synthesize"``, ``"simulate"``, ``"logit-match"``, ``"norm"``, ``"none"``) or
            instance; ``None``: the default, ``"synthesize"``.
        new_class_scale: factor on the new classes' logits after calibration: > 1 favours new classes, < 1 old.
        target_precision: instead of ``new_class_scale``, the precision (a fraction) new classes should have when
            they win: the largest scale up to 1 whose precision the ``"synthesize"`` calibration's simulation
            expects to reach it at this number of new classes (precision first, at the cost of recall); ``None``:
            off.
        allow_existing: allow new names that already name a class of the head.
        allow_projection: extend a CLIP-style projection head anyway (refused by default).
        progress: show progress bars.
    """

    descriptors: DescriptorConfig | None = None
    icis: ICISConfig | None = None
    calibration: str | Calibration | FittableCalibration | None = None
    new_class_scale: float = 1.0
    target_precision: float | None = None
    allow_existing: bool = False
    allow_projection: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if self.descriptors is not None and not isinstance(self.descriptors, DescriptorConfig):
            raise TypeError(f"descriptors must be a DescriptorConfig or None, got {type(self.descriptors).__name__}")
        if self.icis is not None and not isinstance(self.icis, ICISConfig):
            raise TypeError(f"icis must be an ICISConfig or None, got {type(self.icis).__name__}")
        rule = get_calibration(self.calibration)  # raises on unknown names and foreign objects
        check_new_class_scale(self.new_class_scale)
        if self.target_precision is not None:
            _check_target_precision(self.target_precision, self.new_class_scale, rule)
        for flag in ("allow_existing", "allow_projection", "progress"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_dict` gives the config back."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("descriptors", "icis"):
            data[key] = data[key].to_dict() if data[key] is not None else None
        if data["calibration"] is not None and not isinstance(data["calibration"], str):
            data["calibration"] = data["calibration"].to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InjectionConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on unknown keys."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown InjectionConfig fields {sorted(unknown)}")
        data = dict(data)
        if data.get("descriptors") is not None:
            data["descriptors"] = DescriptorConfig.from_dict(data["descriptors"])
        if data.get("icis") is not None:
            data["icis"] = ICISConfig(**data["icis"])
        if isinstance(data.get("calibration"), dict):
            data["calibration"] = rule_from_dict(data["calibration"])
        return cls(**data)


def _check_target_precision(target: object, new_class_scale: float, rule: object) -> None:
    number = isinstance(target, int | float) and not isinstance(target, bool)
    if not (number and math.isfinite(target) and 0 < target < 1):
        raise ValueError(f"target_precision must be a fraction in (0, 1), e.g. 0.3, or None; got {target!r}")
    if new_class_scale != 1.0:
        raise ValueError(
            f"target_precision chooses new_class_scale itself: leave new_class_scale at 1 (got {new_class_scale}) "
            "or set target_precision=None"
        )
    if not isinstance(rule, SynthesizedCalibration):
        raise ValueError(
            f"target_precision needs the expected rates of the 'synthesize' calibration, not {rule.name!r}: use the "
            "default calibration, or set new_class_scale instead"
        )
