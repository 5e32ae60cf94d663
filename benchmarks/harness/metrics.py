"""The protocol's metrics: injected rows scored on a real head's photos (``benchmarks/README.md``, Protocol).

A fold ``k`` holds out 200 classes (:func:`benchmarks.harness.data.fold_classes`); injected rows for them are
scored in the extended head with the 800 real rows:

* ZSL: top-1 on the held-out photos among the 200 held-out classes only (mean over classes).
* GZSL: S on the seen photos, U on the held-out photos, H = 2SU / (S + U).
* cosine: mean cosine between the injected and the true weight vectors.
* :func:`oracle`: the same with the true rows; :func:`picked_on_test_photos`: the best norm factor on the test photos.
  Both are bounds that no method may use.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.harness.data import HeadData
from classifier_injection.calibration import NormCalibration, feature_mean_biases
from classifier_injection.calibration.simulation import DEFAULT_FACTORS

__all__ = [
    "BOUND_FACTORS",
    "BOUND_OFFSETS",
    "check_fold",
    "evaluate_conse",
    "evaluate_rows",
    "mean_of",
    "norm_rows",
    "oracle",
    "picked_on_test_photos",
    "picked_on_test_photos_with_offset",
    "seen_mask",
]

#: Offsets (logits) and factors searched by :func:`picked_on_test_photos_with_offset`.
BOUND_OFFSETS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0)
BOUND_FACTORS = tuple(f for f in DEFAULT_FACTORS if f <= 2.0)


def seen_mask(num_classes: int, held_out: np.ndarray) -> torch.Tensor:
    """Boolean mask ``[num_classes]``: True for the seen classes of a fold."""
    mask = torch.ones(num_classes, dtype=torch.bool)
    mask[torch.as_tensor(np.asarray(held_out), dtype=torch.long)] = False
    return mask


def check_fold(data: HeadData, held_out: np.ndarray) -> torch.Tensor:
    """``held_out`` as a long tensor, checked to be distinct class indices of ``data``'s head."""
    held = torch.as_tensor(np.asarray(held_out), dtype=torch.long)
    if held.dim() != 1 or len(held) == 0 or len(torch.unique(held)) != len(held):
        raise ValueError(f"held_out must be a 1-D array of distinct class indices, got shape {tuple(held.shape)}")
    if held.min() < 0 or held.max() >= len(data.rows):
        raise ValueError(f"held_out indices must lie in [0, {len(data.rows)}), got {held.min()}..{held.max()}")
    return held


def _gzsl(correct: torch.Tensor, seen: torch.Tensor) -> dict[str, float]:
    s = 100 * correct[seen].float().mean().item()
    u = 100 * correct[~seen].float().mean().item()
    return {"seen": s, "unseen": u, "h": 2 * s * u / (s + u) if s + u > 0 else 0.0}


@torch.no_grad()
def evaluate_rows(data: HeadData, held_out: np.ndarray, new_rows: torch.Tensor) -> dict[str, float]:
    """ZSL, GZSL (S, U, H) in percent and the mean row cosine of ``new_rows`` injected for ``held_out``.

    Args:
        data: the head and its photo features.
        held_out: the held-out class indices (sorted, as ``fold_classes`` returns them); row ``i`` of
            ``new_rows`` belongs to class ``held_out[i]``.
        new_rows: the injected rows ``[len(held_out), D + 1]`` (calibrated as they would be injected).

    Returns:
        ``{"zsl", "seen", "unseen", "h", "cosine"}``.
    """
    held = check_fold(data, held_out)
    if new_rows.shape != (len(held), data.rows.shape[1]):
        raise ValueError(
            f"new_rows must be [{len(held)}, {data.rows.shape[1]}] (one row [W | b] per held-out class), "
            f"got {tuple(new_rows.shape)}"
        )
    new_rows = new_rows.detach().to(data.rows.dtype).cpu()
    seen = seen_mask(len(data.rows), held)
    # ZSL: photos of the held-out classes, scored against the held-out classes only.
    position = torch.full((len(data.rows),), -1, dtype=torch.long)
    position[held] = torch.arange(len(held))
    held_photo = position[data.labels] >= 0
    target = position[data.labels[held_photo]]
    zsl_logits = data.features[held_photo] @ new_rows[:, :-1].T + new_rows[:, -1]
    zsl_correct = (zsl_logits.argmax(1) == target).float()
    # Mean over classes of per-class top-1 (one photo per class here, but keep the definition general).
    hits = torch.zeros(len(held)).index_add_(0, target, zsl_correct)
    counts = torch.zeros(len(held)).index_add_(0, target, torch.ones(len(target)))
    zsl = 100 * (hits[counts > 0] / counts[counts > 0]).mean().item()
    # GZSL: the extended head, real seen rows and injected rows in the original class order.
    full = data.rows.clone()
    full[held] = new_rows
    correct = data.logits(full).argmax(1) == data.labels
    photo_seen = seen[data.labels]
    cosine = F.cosine_similarity(new_rows[:, :-1], data.rows[held, :-1], dim=1).mean().item()
    return {"zsl": zsl, **_gzsl(correct, photo_seen), "cosine": cosine}


def oracle(data: HeadData, held_out: np.ndarray) -> dict[str, float]:
    """The metrics with the true rows of the held-out classes: what a perfect injector would reach."""
    held = check_fold(data, held_out)
    return evaluate_rows(data, held_out, data.rows[held])


@torch.no_grad()
def evaluate_conse(data: HeadData, held_out: np.ndarray, descriptors: torch.Tensor, conse) -> dict[str, float]:
    """ConSE by its own rule (it injects no rows); same keys as :func:`evaluate_rows`, ``cosine`` is NaN.

    ZSL: :meth:`~classifier_injection.baselines.ConSE.scores` against the held-out classes' descriptors.
    GZSL: a photo's embedding is matched against all 1000 descriptors; if a held-out class wins, ConSE predicts it,
    otherwise the original head's top seen class (:meth:`~classifier_injection.baselines.ConSE.predict_gzsl`).
    """
    held = check_fold(data, held_out)
    seen = seen_mask(len(data.rows), held)
    seen_rows = data.rows[seen]
    seen_logits = data.logits(seen_rows)  # [photos, 800]
    seen_idx = torch.nonzero(seen).squeeze(1)
    is_held_photo = ~seen[data.labels]
    zsl_scores = conse.scores(seen_logits[is_held_photo], descriptors[seen], descriptors[held])
    zsl = 100 * (held[zsl_scores.argmax(1)] == data.labels[is_held_photo]).float().mean().item()
    prediction = conse.predict_gzsl(seen_logits, descriptors[seen], descriptors[held], seen_idx, held)
    return {"zsl": zsl, **_gzsl(prediction == data.labels, seen[data.labels]), "cosine": float("nan")}


def norm_rows(
    predicted: torch.Tensor, seen_rows: torch.Tensor, factor: float, feature_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows at ``factor`` x the old mean norm; biases: the old mean, or against ``feature_mean`` when given."""
    rows = NormCalibration(factor=factor)(predicted, seen_rows)
    if feature_mean is not None:
        rows[:, -1] = feature_mean_biases(rows[:, :-1], seen_rows, feature_mean)
    return rows


def _best_on_test(data: HeadData, held: np.ndarray, candidates: Iterable[tuple[dict, torch.Tensor]]) -> dict:
    """The candidate ``(labels, rows)`` with the best H on the test photos (first one on ties), with its labels."""
    best = None
    for labels, rows in candidates:
        metrics = evaluate_rows(data, held, rows)
        if best is None or metrics["h"] > best["h"]:
            best = {**metrics, **labels}
    return best


def picked_on_test_photos(data: HeadData, held: np.ndarray, predicted: torch.Tensor, seen_rows: torch.Tensor) -> dict:
    """The norm factor (and bias rule) with the best H on the test photos: an upper bound, never a choice.

    Both bias rules are searched (the mean old bias, and the feature-mean biases when the model has the estimate),
    so the bound is at least as high as either rule family can reach.
    """

    def candidates():
        for factor in DEFAULT_FACTORS:
            yield {"factor": factor, "bias_rule": "mean"}, norm_rows(predicted, seen_rows, factor)
            if data.feature_mean is not None:
                rows = norm_rows(predicted, seen_rows, factor, data.feature_mean)
                yield {"factor": factor, "bias_rule": "feature-mean"}, rows

    return _best_on_test(data, held, candidates())


def picked_on_test_photos_with_offset(
    data: HeadData, held: np.ndarray, predicted: torch.Tensor, seen_rows: torch.Tensor
) -> dict | None:
    """The (norm factor, bias offset) pair with the best H on the test photos, feature-mean biases plus offset.

    The bound of the rules with an offset: it searches the plane they move in. ``None`` without a feature mean.
    """
    if data.feature_mean is None:
        return None

    def candidates():
        for factor in BOUND_FACTORS:
            rows = norm_rows(predicted, seen_rows, factor, data.feature_mean)
            for offset in BOUND_OFFSETS:
                shifted = rows.clone()
                shifted[:, -1] += offset
                yield {"factor": factor, "offset": offset}, shifted

    return _best_on_test(data, held, candidates())


def mean_of(rows: list[dict], key: str) -> float:
    """Mean of ``key`` over result dicts (folds, splits)."""
    return float(np.mean([r[key] for r in rows]))
