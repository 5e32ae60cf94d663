"""The methods of the tables and how one runs on one fold, through the library's own pipeline.

:func:`run_method` is :func:`classifier_injection.core.predict_rows` (what ``inject()`` runs: the fit seeded,
the injector factory copied before it, the calibration fitted on a context of the seen classes) on a fold's seen
rows and descriptors, followed by :func:`~benchmarks.harness.metrics.evaluate_rows`. ConSE injects no rows and is
scored by its own rule (:func:`run_conse`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

import benchmarks.harness.research_rules  # noqa: F401  (registers the research calibration rules)
from benchmarks.harness.data import HeadData, load_model
from benchmarks.harness.metrics import check_fold, evaluate_conse, evaluate_rows, seen_mask
from benchmarks.harness.research_injectors import (
    DirectionEnsemble,
    FeatureSeparatedICIS,
    NeighbourContrast,
    RefitSimulationICIS,
    ResidualICIS,
    SeparatedICIS,
    TemperedICIS,
)
from classifier_injection.baselines import (
    ConSE,
    COSTAInjector,
    MLPInjector,
    RidgeInjector,
    SubRegInjector,
    VGSESMOInjector,
    VGSEWAvgInjector,
)
from classifier_injection.core import predict_rows
from classifier_injection.features import feature_statistics
from classifier_injection.heads import find_head
from classifier_injection.icis import ICISConfig, ICISInjector

__all__ = ["METHODS", "Method", "lite0_feature_statistics", "make_injector", "run_any", "run_conse", "run_method"]


@functools.cache
def lite0_feature_statistics() -> tuple[torch.Tensor, torch.Tensor]:
    """lite0's feature mean and spread (its backbone's, the same under any head): for the user regime's main case."""
    model = load_model("tf_efficientnet_lite0")
    statistics = feature_statistics(model, find_head(model))
    return statistics.mean, statistics.std


@dataclass(frozen=True)
class Method:
    """One row of the tables: how to build the injector and which calibration to apply."""

    name: str
    build: Callable[[], object]
    calibration: str | None = None  # None: the library default (classifier_injection.calibration)
    description: str = ""
    first_fold_only: bool = False


#: Run order: training-free and cheap methods first, ICIS with the paper's settings (slowest) last.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ridge", lambda: RidgeInjector(), description="closed-form ridge regression"),
        Method("conse", lambda: ConSE(), description="ConSE (Norouzi et al. 2014), its own GZSL rule"),
        Method("costa", lambda: COSTAInjector(), description="COSTA (Mensink et al. 2014)"),
        Method("vgse-wavg", lambda: VGSEWAvgInjector(), description="VGSE-WAvg (Xu et al. 2022)"),
        Method("icis", lambda: ICISInjector(seed=0), description="ICIS, library defaults + default calibration"),
        Method("vgse-smo", lambda: VGSESMOInjector(), description="VGSE-SMO (Xu et al. 2022)"),
        Method("mlp", lambda: MLPInjector(), description="single MLP, cosine loss"),
        Method("subreg", lambda: SubRegInjector(), description="Sub.Reg. (Akyürek et al. 2022)"),
        Method(
            "icis-no-cross",
            lambda: ICISInjector(ICISConfig(cross_reconstruction=False), seed=0),
            description="ablation: no A->W / W->A terms",
        ),
        Method(
            "icis-no-row-encoder",
            lambda: ICISInjector(ICISConfig(row_encoder=False), seed=0),
            description="ablation: no W->W / W->A terms (the row encoder is not trained; a fit about twice as fast)",
        ),
        Method(
            "icis-batch32",
            lambda: ICISInjector(ICISConfig(batch_size=32, max_epochs=20), seed=0),
            description="ICIS trained 20 epochs of batch 32 (a fit about twice as fast as the slope-stopped default)",
        ),
        Method(
            "icis-batch32-30",
            lambda: ICISInjector(ICISConfig(batch_size=32, max_epochs=30), seed=0),
            description="ICIS trained 30 epochs of batch 32 (a fit about 1.5 times as fast as the default)",
        ),
        Method(
            "icis-target30",
            lambda: ICISInjector(seed=0),
            calibration="synthesize-target",
            description="ICIS, the default calibration at InjectionConfig(target_precision=0.3)",
        ),
        Method(
            "icis-refit",
            lambda: RefitSimulationICIS(seed=0),
            description="ablation: the calibration's simulation refits ICIS on the kept classes (a second fit)",
        ),
        Method(
            "icis-no-new-descriptors",
            lambda: ICISInjector(ICISConfig(include_new_descriptors=False), seed=0),
            description="ablation: new classes' descriptors not used in training",
        ),
        Method(
            "icis-loo",
            lambda: ICISInjector(ICISConfig(exclude_own_row=True), seed=0),
            description="row variant: the mixture learns to rebuild each seen row from the other rows only",
        ),
        Method("icis-sharp", lambda: TemperedICIS(0.5), description="row variant: mixture weights at temperature 0.5"),
        Method("icis-flat", lambda: TemperedICIS(2.0), description="row variant: mixture weights at temperature 2"),
        Method(
            "icis+vgse-smo",
            lambda: DirectionEnsemble([ICISInjector(seed=0), VGSESMOInjector()]),
            description="row variant: the mean unit direction of ICIS's and VGSE-SMO's rows",
        ),
        Method(
            "icis-contrast",
            lambda: NeighbourContrast(ICISInjector(seed=0)),
            description="row variant: descriptors minus half the mean of their 10 nearest seen descriptors",
        ),
        Method(
            "icis-separated",
            lambda: SeparatedICIS(1.0, 10.0, leave_out=True),
            description="row variant: a separation term (each seen row rebuilt from the others nearest its own row)",
        ),
        Method(
            "icis-feature-separated",
            lambda: FeatureSeparatedICIS(*lite0_feature_statistics(), weight=1.0),
            description="row variant: each seen row rebuilt without itself must win its synthesised features and "
            "lose its 5 nearest classes' (weight 1, lite0's feature statistics)",
        ),
        Method(
            "icis-residual",
            lambda: ResidualICIS(3.0),
            description="row variant: plus a ridge map from descriptor residuals to row residuals (alpha 3)",
        ),
        Method(
            "icis-residual10",
            lambda: ResidualICIS(10.0),
            description="row variant: plus a ridge map from descriptor residuals to row residuals (alpha 10)",
        ),
        Method("icis-mse", lambda: ICISInjector(ICISConfig(loss="mse"), seed=0), description="ablation: MSE loss"),
        Method(
            "icis-linear",
            lambda: ICISInjector(ICISConfig(row_decoder="linear", dropout=0.0), seed=0),
            description="ablation: the paper's linear row decoder, no dropout (the previous library default)",
        ),
        Method(
            "icis-paper",
            lambda: ICISInjector(ICISConfig.paper(), seed=0),
            calibration="none",
            description="ICIS, the paper's settings (batch 16, lr 1e-5, slope stop), no calibration",
            first_fold_only=True,
        ),
    )
}


def make_injector(method: str):
    """A fresh, unfitted injector of the method named ``method`` (a key of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method].build()


def run_method(
    data: HeadData,
    held_out: np.ndarray,
    descriptors: torch.Tensor,
    injector,
    calibration=None,
    *,
    seed: int = 0,
) -> dict[str, float]:
    """Fit ``injector`` on the seen classes of a fold, predict and calibrate the held-out rows, evaluate.

    Args:
        data: the head and its photo features (its image-free feature statistics go to the calibration).
        held_out: the fold's held-out class indices.
        descriptors: ``[1000, d]`` descriptors of all classes (``fold_descriptors``).
        injector: an unfitted injector; the held-out descriptors are its ``new_descriptors``.
        calibration: anything :func:`~classifier_injection.calibration.get_calibration` accepts; ``None`` is the
            library default.
        seed: seed of the fit and of the calibration's random choices.

    Returns:
        :func:`evaluate_rows`'s metrics plus ``fit_seconds``, ``predict_seconds`` and ``calibration_seconds``.
    """
    held = check_fold(data, held_out)
    if descriptors.shape[0] != len(data.rows):
        raise ValueError(f"descriptors must have one row per class ({len(data.rows)}), got {descriptors.shape[0]}")
    seen = seen_mask(len(data.rows), held)
    prediction = predict_rows(
        data.rows[seen],
        descriptors[seen],
        descriptors[held],
        injector,
        calibration,
        features=data.statistics(),
        seed=seed,
    )
    return {
        **evaluate_rows(data, held, prediction.rows),
        "fit_seconds": prediction.seconds["fit"],
        "predict_seconds": prediction.seconds["predict"],
        "calibration_seconds": prediction.seconds["calibration"],
    }


def run_conse(data: HeadData, held_out: np.ndarray, descriptors: torch.Tensor, conse) -> dict[str, float]:
    """:func:`~benchmarks.harness.metrics.evaluate_conse` with timing (no training: ``fit_seconds`` is 0)."""
    start = time.perf_counter()
    result = evaluate_conse(data, held_out, descriptors, conse)
    return {**result, "fit_seconds": 0.0, "calibration_seconds": 0.0, "eval_seconds": time.perf_counter() - start}


def run_any(data: HeadData, held_out: np.ndarray, descriptors: torch.Tensor, injector, calibration=None) -> dict:
    """:func:`run_conse` for ConSE, :func:`run_method` for every injector."""
    if isinstance(injector, ConSE):
        return run_conse(data, held_out, descriptors, injector)
    return run_method(data, held_out, descriptors, injector, calibration)
