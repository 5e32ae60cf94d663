"""What the calibration studies share: a fold's injection as a calibration context, and seen-class inner splits.

:func:`injection_context` is the benchmarks' one constructor of a
:class:`~classifier_injection.calibration.CalibrationContext`: the studies that compare several rules fit them all
on one context, so the simulated injections and synthesised features are computed once (the context's memo), and
each rule's choice is what it would make alone. Everything a rule sees is image-free; photos only score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.harness.data import CACHE, HeadData, fold_classes, head_data, load_model
from benchmarks.harness.descriptors import embedding_cache
from benchmarks.harness.metrics import evaluate_rows, mean_of, seen_mask
from benchmarks.harness.user_regime import REGIMES
from classifier_injection import InjectionConfig, inject
from classifier_injection.baselines import RidgeInjector
from classifier_injection.calibration import (
    CalibrationContext,
    FactorChoice,
    SimulatedCalibration,
    SynthesizedCalibration,
    simulate_injections,
)
from classifier_injection.calibration.reliability import reliability_table
from classifier_injection.calibration.simulation import prototype_scores, simulated_head
from classifier_injection.core import calibration_context, copying_factory
from classifier_injection.features import FeatureStatistics
from classifier_injection.icis import ICISInjector

__all__ = [
    "FIT_CACHE",
    "HELD_OUT_REPEATS",
    "INJECTORS",
    "OFFSET_VARIANTS",
    "SYNTHESIZE_DROPS",
    "SYNTHESIZE_OFFSETS",
    "CachedICIS",
    "InnerSplit",
    "RecordingSimulated",
    "fold_context",
    "fold_inputs",
    "forget_choices",
    "held_out_injections",
    "injection_context",
    "inner_split",
    "inner_summary",
    "last_recorded",
    "prototype_reliability",
    "prototype_wins",
    "recorded_injection",
    "share_default_simulation",
]

FIT_CACHE = CACHE / "calibration"
#: Random hold-outs of the old classes (each the default rule's share of them) in :func:`held_out_injections`.
HELD_OUT_REPEATS = 3
#: Budgets (``max_seen_drop``) and offsets swept by the ``synthesize`` tunings.
SYNTHESIZE_DROPS = (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0)
SYNTHESIZE_OFFSETS = (0.0, 1.0, 2.0, 3.0)
#: The default rule and its offset variants, each with the budget chosen for its offset on lite0's seen classes.
OFFSET_VARIANTS = {
    "synthesize": SynthesizedCalibration(),
    "synthesize, no offset": SynthesizedCalibration(max_seen_drop=2.5, floor_tolerance=0.1, offset=0.0),
    "synthesize, offset 2": SynthesizedCalibration(max_seen_drop=6.0, offset=2.0),
    "synthesize, offset 3": SynthesizedCalibration(max_seen_drop=12.0, offset=3.0),
}


def _digest(*tensors: torch.Tensor, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        t = t.detach().float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:20]


class CachedICIS(ICISInjector):
    """ICIS whose trained weights are cached in ``benchmarks/.cache/calibration``, keyed by the fit's inputs.

    Why: the calibration studies refit the same ICIS many times (folds, inner splits, the rules' simulations).
    """

    def fit(self, seen_descriptors, seen_rows, new_descriptors=None) -> CachedICIS:
        extra = json.dumps([self.config.to_dict(), self.seed], sort_keys=True)
        key = _digest(
            seen_descriptors, seen_rows, *([new_descriptors] if new_descriptors is not None else []), extra=extra
        )
        path = FIT_CACHE / f"icis-{key}.safetensors"
        if path.is_file():
            loaded = ICISInjector.load(str(path))
            self.model, self.history = loaded.model, loaded.history
            return self
        start = time.perf_counter()
        super().fit(seen_descriptors, seen_rows, new_descriptors)
        print(f"    ICIS fit: {len(self.history)} epochs, {time.perf_counter() - start:.0f}s", flush=True)
        FIT_CACHE.mkdir(parents=True, exist_ok=True)
        self.save(str(path), overwrite=True)
        return self


#: The calibration studies' injectors: ICIS (library defaults, fits cached) and ridge (a very different injector).
INJECTORS = {"icis": lambda: CachedICIS(seed=0), "ridge": RidgeInjector}


def fold_inputs(data: HeadData, descriptors: torch.Tensor | tuple[torch.Tensor, torch.Tensor], fold: int):
    """``(held, seen mask, seen descriptors, new descriptors, seen rows)`` of a fold.

    ``descriptors``: one ``[1000, d]`` matrix, or a pair (as seen classes, as new classes).
    """
    seen_matrix, new_matrix = descriptors if isinstance(descriptors, tuple) else (descriptors, descriptors)
    held = fold_classes(fold, len(data.rows))
    seen = seen_mask(len(data.rows), held)
    return held, seen, seen_matrix[seen], new_matrix[torch.as_tensor(held)], data.rows[seen]


def injection_context(
    injector,
    seen_descriptors: torch.Tensor,
    seen_rows: torch.Tensor,
    new_descriptors: torch.Tensor,
    features: FeatureStatistics | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, CalibrationContext]:
    """Fit ``injector`` as ``inject()`` does (seeded; factory copied before) and return its rows and their context."""
    factory = copying_factory(injector)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        injector.fit(seen_descriptors, seen_rows, new_descriptors)
    predicted = injector.predict(new_descriptors).detach().float()
    context = calibration_context(
        seen_rows, predicted, seen_descriptors, new_descriptors, factory, features=features, seed=seed
    )
    return predicted, context


def fold_context(data: HeadData, descriptors, fold: int, injector_name: str):
    """One fold's injection: ``(held-out classes, predicted rows, calibration context)``."""
    held, _, seen_a, new_a, seen_rows = fold_inputs(data, descriptors, fold)
    predicted, context = injection_context(INJECTORS[injector_name](), seen_a, seen_rows, new_a, data.statistics())
    return held, predicted, context


def share_default_simulation(context: CalibrationContext) -> None:
    """Compute the default rule's simulated injections and synthesised features into ``context``'s memo.

    Rules fitted afterwards on the context reuse them, so their timings are their own work alone.
    """
    default = SynthesizedCalibration()
    simulate_injections(simulated_head(context), default.holdout_fraction, default.repeats)
    if context.feature_mean is not None and context.feature_std is not None:
        default.synthesized_features(context)


@dataclass
class InnerSplit:
    """One fold's seen-class validation split: 160 of the 800 seen classes play the new classes."""

    sub: HeadData  # the head data restricted to the 800 seen classes
    held: np.ndarray  # indices (among the seen classes) of the 160 inner held-out classes
    kept_rows: torch.Tensor  # [640, D + 1]
    predicted: torch.Tensor  # [160, D + 1]: the injector's rows for the inner held-out classes
    context: CalibrationContext  # what a rule sees on the 640-class head
    true_s: float  # the model's own accuracy on the seen photos


def inner_split(data: HeadData, descriptors, fold: int, injector_name: str, split_seed: int | None = None):
    """The inner split of ``fold`` (``randperm`` seeded ``split_seed``, by default ``1000 + fold``), with
    ``injector_name`` refitted on its 640 kept classes. Only seen-class photos are ever scored on it."""
    _, seen, seen_a, _, seen_rows = fold_inputs(data, descriptors, fold)
    seed = 1000 + fold if split_seed is None else split_seed
    perm = torch.randperm(len(seen_rows), generator=torch.Generator().manual_seed(seed))
    inner_held, inner_kept = perm[:160].sort().values, perm[160:].sort().values
    sub = data.restricted(torch.nonzero(seen).squeeze(1))
    kept_rows, held_np = seen_rows[inner_kept], inner_held.numpy()
    predicted, context = injection_context(
        INJECTORS[injector_name](), seen_a[inner_kept], kept_rows, seen_a[inner_held], data.statistics()
    )
    true_s = evaluate_rows(sub, held_np, seen_rows[inner_held])["seen"]
    return InnerSplit(sub, held_np, kept_rows, predicted, context, true_s)


def inner_summary(table: dict[tuple, list[dict]]) -> dict[tuple, dict]:
    """Per setting, the mean over folds of the inner split's ``h``, ``s_drop`` and ``factor``, and ``s_drop_se``
    (the standard error of the S drop over the folds; 0 with one fold)."""
    summary = {k: {m: mean_of(v, m) for m in ("h", "s_drop", "factor")} for k, v in table.items()}
    for k, v in table.items():
        drops = [r["s_drop"] for r in v]
        summary[k]["s_drop_se"] = float(np.std(drops, ddof=1) / np.sqrt(len(drops))) if len(drops) > 1 else 0.0
    return summary


class _Records:
    """A simulation rule that keeps the context it chose on and its choice in ``_RECORDED``."""

    def select(self, context: CalibrationContext) -> FactorChoice:
        choice = super().select(context)
        _RECORDED.update(context=context, choice=choice)
        return choice


@dataclass(frozen=True)
class _Recording(_Records, SynthesizedCalibration):
    """The default rule, recording."""


@dataclass(frozen=True)
class RecordingSimulated(_Records, SimulatedCalibration):
    """The ``simulate`` rule (what a model without feature statistics gets), recording: :func:`last_recorded`."""


_RECORDED: dict = {}


def forget_choices() -> None:
    """Drop the calibration choices the benchmarks' cache holds, so that the next ``inject()`` simulates anew."""
    shutil.rmtree(embedding_cache().directory / "calibration", ignore_errors=True)


def last_recorded() -> tuple[CalibrationContext, FactorChoice]:
    """The context and choice of the last recording rule that chose."""
    return _RECORDED["context"], _RECORDED["choice"]


def prototype_wins(
    seen_rows: torch.Tensor, held_out: torch.Tensor, predicted_rows: torch.Tensor, factor: float
) -> torch.Tensor:
    """``[N, H]``: held-out row ``i`` at ``factor`` out-scores every kept row on class ``n``'s prototype (its row's
    direction; biases left out): the ``simulate`` rule's view of a win."""
    old, new = prototype_scores(seen_rows, held_out, predicted_rows)
    return factor * new > old.max(dim=1).values[:, None]


def prototype_reliability(context: CalibrationContext, rule: SimulatedCalibration, factor: float) -> dict:
    """:func:`~classifier_injection.calibration.reliability.reliability_table` of ``rule``'s first simulated
    injection at ``factor``, scored on the rows' directions (what models without feature statistics were told)."""
    context = simulated_head(context)
    held, predicted = simulate_injections(context, rule.holdout_fraction, rule.repeats, rule.name)[0]
    seen_rows = context.seen_rows.detach().float().cpu()
    wins = prototype_wins(seen_rows, held, predicted, factor)
    return reliability_table(wins, torch.arange(len(seen_rows)), seen_rows, held, predicted)


def recorded_injection(
    model_name: str, regime: str, rule: SynthesizedCalibration | None = None
) -> tuple[CalibrationContext, FactorChoice]:
    """The calibration context and choice of ``rule`` (the default) when ``inject()`` adds "capybara" to the model's
    full head with the descriptors of a user-regime ``regime``, simulated anew: what a first injection records."""
    rule = rule or SynthesizedCalibration()
    forget_choices()
    config = InjectionConfig(descriptors=REGIMES[regime], calibration=_Recording(**rule.to_dict()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the unreliable-class warning
        inject(load_model(model_name), ["capybara"], config, cache=embedding_cache())
    return last_recorded()


def held_out_injections(model: str, k: int, regime: str, repeats: int = HELD_OUT_REPEATS):
    """Injections of held-out old classes, on which a setting may be chosen: the default rule's simulation of the
    injection of "capybara" into the full head, its held-out rows refitted as a new class's are (an injector trained
    on the kept classes), injected ``k`` at a time in a seeded random order among all the other true rows.

    Yields ``(old rows, predicted rows, their classes, the rule's factor)`` per injection, over ``repeats`` hold-outs
    of the rule's share of the classes.
    """
    rule = SynthesizedCalibration()
    context, choice = recorded_injection(model, regime, rule)
    context = dataclasses.replace(simulated_head(context), fitted_injector=None)
    rows = head_data(model).rows
    generator = torch.Generator().manual_seed(0)
    for held, predicted in simulate_injections(context, rule.holdout_fraction, repeats):
        order = torch.randperm(len(held), generator=generator)
        for start in range(0, len(held) - k + 1, k):
            group = order[start : start + k]
            keep = torch.ones(len(rows), dtype=torch.bool)
            keep[held[group]] = False
            yield rows[keep], predicted[group], held[group], choice.factor
    print(f"{model} {regime} held-out classes done", flush=True)
