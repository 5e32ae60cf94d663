"""Calibration: give predicted rows a scale and bias at which they can compete with the old rows.

Injectors predict the direction of a row well and its scale poorly, so uncalibrated new rows almost never win
in the extended head. Rules are chosen by name (:func:`get_calibration`); the default, ``"synthesize"``,
simulates an injection of the head's own classes and scores it on features synthesised from the model's
statistics. No rule ever sees a photo. Why this default, and what else was tried: ``docs/decisions.md``.
"""

from .base import (
    Calibration,
    CalibrationContext,
    FactorChoice,
    FittableCalibration,
    ScaledCalibration,
    apply_new_class_scale,
    check_new_class_scale,
    default_calibration,
    feature_mean_biases,
    fit_calibration,
    get_calibration,
    register_calibration,
)
from .cache import CalibrationCache
from .rules import LogitMatchCalibration, NoCalibration, NormCalibration, SimulatedCalibration, SynthesizedCalibration
from .simulation import simulate_injections, synthesize_features, synthetic_gzsl_curve

__all__ = [
    "Calibration",
    "CalibrationCache",
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
    "default_calibration",
    "feature_mean_biases",
    "fit_calibration",
    "get_calibration",
    "register_calibration",
    "simulate_injections",
    "synthesize_features",
    "synthetic_gzsl_curve",
]
