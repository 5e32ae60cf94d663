"""On-disk cache of the calibration's choice per head, so repeated injections skip the simulation.

A simulation rule's choice (:class:`~classifier_injection.calibration.FactorChoice`) depends on the old classes'
rows and descriptors, the feature statistics, the injector's configuration, the rule and the seed; when the
simulation uses the injection's own fit (``context.fitted_injector``), also on the fit's device and, if that fit
read them (``reads_new_descriptors``), on the new classes' descriptors; with a trained injector's fit it is not
cached (it costs no fit). Otherwise injecting other classes into the same head reuses the choice: only the
per-row biases, which need the new rows, are recomputed. The key covers every input of the rule, the library
version and the source of the modules the simulation runs (the injector's own included), so a cached choice is
the one a fresh simulation would make.

Only injectors that declare ``cacheable = True`` (ICIS and the library's baselines: their fit is fixed by their
class, ``hparams()`` and the seed) are cached; a user's own injector is simulated every time. One JSON file per
key; nothing is unpickled; a damaged file is ignored and rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..cache import fit_key, reads_new_descriptors
from ..serialization import atomic_write_text
from .base import CalibrationContext, FactorChoice

__all__ = ["CalibrationCache"]

_logger = logging.getLogger(__name__)

#: Files whose code decides a simulation rule's choice; a change to any of them invalidates the cache.
_SIMULATION_MODULES = (
    "calibration/base.py",
    "calibration/simulation.py",
    "calibration/rules.py",
    "calibration/reliability.py",
    "icis.py",
    "baselines.py",
    "injector.py",
)


def choice_key(rule: object, context: CalibrationContext) -> str | None:
    """The cache key of ``rule``'s choice on ``context``, or ``None`` when it cannot be cached safely."""
    if context.injector_factory is None or not callable(getattr(rule, "to_dict", None)):
        return None
    # A simulation that refits uses fresh copies, so a trained injector simulates as an untrained one: what its last
    # fit gave (ICIS's ``epochs_trained``) is not part of the key.
    injector = context.injector_factory()
    left_out = context.fitted_injector is not None
    if left_out and getattr(injector, "is_fitted", False):
        return None  # the simulation uses a trained injector's weights, which no key covers (and costs no fit)
    description = {
        "rule": [type(rule).__module__, type(rule).__qualname__, rule.to_dict()],
        "seed": context.seed,
        "feature_source": context.feature_source,
        "simulation": "left-out" if left_out else "refit",
        "device": str(getattr(injector, "device", None)) if left_out else None,
    }
    tensors = (
        context.seen_rows,
        context.seen_descriptors,
        context.feature_mean,
        context.feature_std,
        context.new_descriptors if left_out and reads_new_descriptors(injector) else None,
    )
    return fit_key(injector, _SIMULATION_MODULES, description, tensors)


class CalibrationCache:
    """Calibration choices on disk, one JSON file per (head, descriptors, injector, rule, seed).

    Args:
        directory: where the files live; created on first write.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory).expanduser()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> FactorChoice | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return FactorChoice.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as err:  # damaged or foreign: recompute, the put rewrites it
            _logger.warning("ignoring unreadable calibration cache %s (%s)", path, err)
            return None

    def put(self, key: str, choice: FactorChoice) -> None:
        """Store ``choice`` atomically (readers never see a half-written file)."""
        atomic_write_text(self.path(key), json.dumps(choice.to_dict(), sort_keys=True))

    def select(self, rule: object, context: CalibrationContext) -> FactorChoice:
        """``rule.select(context)``, read from the cache when this choice was made before."""
        key = choice_key(rule, context)
        if key is not None and (choice := self.get(key)) is not None:
            _logger.info("calibration: reusing the cached choice %s (factor %.3f)", key, choice.factor)
            return choice
        choice = rule.select(context)
        if key is not None:
            try:
                self.put(key, choice)
            except OSError as err:  # a read-only or broken cache folder must not stop the injection
                _logger.warning("could not write the calibration cache %s (%s): continuing without it", self, err)
        return choice

    def __repr__(self) -> str:
        return f"CalibrationCache({str(self.directory)!r})"
