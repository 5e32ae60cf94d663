"""Calibration: give predicted rows a scale and bias at which they can compete with the old rows.

Injectors trained with a cosine loss (ICIS) predict the *direction* of a row; plain regressors shrink
norms towards the mean. Either way, uncalibrated new rows rarely win once the old rows compete in the
extended head. A calibration maps predicted rows ``[K, D + 1]`` to final rows, seeing only the old rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch

__all__ = ["Calibration", "NoCalibration", "NormCalibration", "get_calibration"]


@runtime_checkable
class Calibration(Protocol):
    name: str

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        """Calibrated copy of ``new_rows`` given the head's ``seen_rows`` (both ``[*, D + 1]``)."""
        ...

    def to_dict(self) -> dict: ...


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

    def __call__(self, new_rows: torch.Tensor, seen_rows: torch.Tensor) -> torch.Tensor:
        weights, biases = seen_rows[:, :-1], seen_rows[:, -1]
        target = weights.norm(dim=1).mean() * self.factor
        new_w = new_rows[:, :-1]
        new_w = new_w / new_w.norm(dim=1, keepdim=True).clamp_min(1e-12) * target
        std = biases.std() if len(biases) > 1 else biases.new_zeros(())
        new_b = (biases.mean() + self.bias_shift * std).expand(len(new_rows))
        return torch.cat([new_w, new_b[:, None]], dim=1)

    def to_dict(self) -> dict:
        return asdict(self)


_REGISTRY = {"none": NoCalibration, "norm": NormCalibration}


def get_calibration(calibration: str | Calibration | None) -> Calibration:
    """Resolve a name (``"norm"``, ``"none"``) or an instance; ``None`` gives the library default."""
    if calibration is None:
        return NormCalibration()
    if isinstance(calibration, str):
        if calibration not in _REGISTRY:
            raise ValueError(f"unknown calibration {calibration!r}; choose one of {sorted(_REGISTRY)}")
        return _REGISTRY[calibration]()
    if not isinstance(calibration, Calibration):
        raise TypeError(f"calibration must be a name or a Calibration, got {type(calibration).__name__}")
    return calibration
