"""How far to trust each new class: expected precision and recall from the simulation, and its neighbours.

A new row predicted from text is a blend of its neighbours' rows, and the closer it sits to one old row the more
of that class's photos it takes. The ``synthesize`` rule's simulation measures this on the head's own classes:
each held-out row, calibrated as the real new rows will be, is scored alone against the kept rows on features
synthesised to be confused with their classes' neighbours as photos are (recall on its class's features; precision
against the kept classes' features it wins). Without feature statistics there are no such features, and no rates:
the rows' own directions make wins far easier and cleaner than photos do.
:func:`reliability_table` bins those rows by their cosine to the nearest kept row, a statistic of the head
alone; :func:`assess` gives a new class the rates of its bin and the old classes nearest to it;
:func:`expected_rates` scores them in groups, as a user's injection of several classes.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import torch

from ..injector import top_cosines
from .simulation import held_mask, new_row_responses, synthetic_scores

__all__ = [
    "BINS",
    "EXPECTED_COUNTS",
    "EXPECTED_SCALES",
    "assess",
    "expected_at",
    "expected_rates",
    "least_reliable",
    "nearest_cosines",
    "reliability_table",
    "scale_for_precision",
    "synthetic_wins",
]

#: Quantile bins of the nearest-row cosine over the simulated rows.
BINS = 5
#: Numbers of new classes, and ``new_class_scale`` values, the expected rates are simulated for.
EXPECTED_COUNTS = (1, 10, 100)
EXPECTED_SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0)


def nearest_cosines(rows: torch.Tensor, seen_rows: torch.Tensor, top: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest cosines ``[K, top]`` between each row's weights and the seen rows', and their indices."""
    seen = seen_rows[:, :-1].detach().float()
    values, indices = top_cosines(seen, rows[:, :-1].detach().float(), top)
    return values.cpu(), indices.cpu()


def synthetic_wins(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    features: torch.Tensor,
    feature_mean: torch.Tensor,
    factor: float,
    offset: float,
) -> torch.Tensor:
    """``[M, H]``: held-out row ``i`` at ``factor`` and ``offset`` out-scores every kept row on feature ``m``."""
    target, old, responses = synthetic_scores(seen_rows, held_out, predicted_rows, features, feature_mean)
    return target + offset + factor * responses > old.max(dim=1).values[:, None]


def reliability_table(
    wins: torch.Tensor,
    labels: torch.Tensor,
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    win_share: float = 1.0,
) -> dict:
    """Recall and precision (%) of simulated rows per bin of their nearest-kept-row cosine; JSON-able.

    Args:
        wins: ``[M, H]`` from :func:`synthetic_wins` (each row scored alone).
        labels: the class ``[M]`` of each scored feature.
        seen_rows: the simulated head ``[N, D + 1]``.
        held_out: the held-out classes ``[H]``; ``predicted_rows`` ``[H, D + 1]`` are their simulated rows.
        win_share: share of the wins counted in the recall (1: the simulation's own).
    """
    held = held_mask(len(seen_rows), held_out)
    own = labels[:, None] == held_out[None, :]
    hits, stolen, photos = (wins & own).sum(0), (wins & (~held[labels])[:, None]).sum(0), own.sum(0)
    cosine = nearest_cosines(predicted_rows, seen_rows[~held])[0][:, 0]
    edges = torch.quantile(cosine, torch.linspace(0, 1, BINS + 1)[1:-1]) if len(cosine) >= BINS else cosine[:0]
    bins = torch.bucketize(cosine, edges)
    recall, precision = [], []
    for b in range(len(edges) + 1):
        members = bins == b
        tp, fp, n = int(hits[members].sum()), int(stolen[members].sum()), int(photos[members].sum())
        recall.append(round(100 * win_share * tp / n, 1) if n else None)
        precision.append(round(100 * tp / (tp + fp), 1) if tp + fp else None)
    return {
        "statistic": "nearest_cosine",
        "edges": [round(float(e), 4) for e in edges],
        "recall": recall,
        "precision": precision,
        "rows": len(cosine),
    }


def assess(
    new_rows: torch.Tensor, seen_rows: torch.Tensor, seen_names: Sequence[str], table: dict | None, top: int = 3
) -> list[dict]:
    """Per new row: the ``top`` nearest old classes and, with a :func:`reliability_table`, its expected rates (%).

    Returns one ``{"nearest": [[name, cosine], ...], "expected_precision", "expected_recall"}`` per row (rates
    ``None`` without a table or where the simulation had no evidence).
    """
    cosines, index = nearest_cosines(new_rows, seen_rows, top)
    out = []
    for row_cosines, row_index in zip(cosines.tolist(), index.tolist(), strict=True):
        entry: dict = {"nearest": [[seen_names[j], round(c, 3)] for c, j in zip(row_cosines, row_index, strict=True)]}
        if table is not None:
            b = int(torch.bucketize(torch.tensor(row_cosines[0]), torch.tensor(table["edges"])))
            entry["expected_precision"], entry["expected_recall"] = table["precision"][b], table["recall"][b]
        out.append(entry)
    return out


def least_reliable(entries: Sequence[dict], table: dict | None) -> list[int]:
    """Indices of the :func:`assess` entries in the table's least precise bin (none when it has a single bin).

    Relative, not a threshold: the least precise bin is what the photos confirmed (with WordNet definitions), while
    the most precise bin is over-rated (rows far from every old row, which rarely win at all).
    """
    rated = [p for p in (table or {}).get("precision", []) if p is not None]
    if len(rated) < 2 or min(rated) == max(rated):
        return []
    return [i for i, e in enumerate(entries) if e.get("expected_precision") == min(rated)]


def expected_rates(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    feature_mean: torch.Tensor,
    factor: float,
    offset: float,
    counts: Sequence[int] = EXPECTED_COUNTS,
    scales: Sequence[float] = EXPECTED_SCALES,
    seed: int = 0,
    win_share: float = 1.0,
) -> dict:
    """Recall and precision (%) and old features taken per new class when ``k`` simulated classes are added; JSON-able.

    As a user adds ``k`` classes: the held-out rows in seeded groups of ``k``, calibrated at ``factor`` and
    ``offset`` and their logits times each ``new_class_scale``, each group against every true row but its own
    classes'. Lists are indexed ``[count][scale]``; counts larger than the held-out classes are capped. Recall and
    features taken count ``win_share`` of the wins (1: the simulation's own rates); precision counts them all.
    """
    rows = seen_rows.float()
    target, responses = new_row_responses(rows[~held_mask(len(rows), held_out)], predicted_rows, features, feature_mean)
    counts = sorted({min(max(1, int(k)), len(held_out)) for k in counts})
    # The best old logit without a group's classes is among each feature's top (largest group + 1) old logits.
    top = (features @ rows[:, :-1].T + rows[:, -1]).topk(min(counts[-1] + 1, len(rows)), dim=1)
    order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(seed))
    scale = torch.tensor([float(s) for s in scales])[:, None]
    per_class = len(labels) / len(rows)
    out: dict = {"new_classes": counts, "scales": [float(s) for s in scales]}
    out |= {"recall": [], "precision": [], "stolen_per_class": []}
    for k in counts:
        groups = order[: len(order) // k * k].reshape(-1, k)
        wins, right, photos = torch.zeros(len(scales)), torch.zeros(len(scales)), 0
        for group in groups:
            classes = held_out[group]
            best_old = top.values.masked_fill(torch.isin(top.indices, classes), -math.inf).max(1).values
            best_new, which = responses[:, group].max(1)
            won = scale * (target + offset + factor * best_new[None]) > best_old[None]
            correct = won & (classes[which] == labels)[None]
            photos += int(torch.isin(labels, classes).sum())
            wins, right = wins + won.sum(1), right + correct.sum(1)
        pairs = list(zip(right.tolist(), wins.tolist(), strict=True))
        out["recall"].append([round(100 * win_share * r / photos, 1) for r, _ in pairs])
        out["precision"].append([round(100 * r / w, 1) if w else None for r, w in pairs])
        out["stolen_per_class"].append(
            [round(win_share * (w - r) / (len(groups) * k) / per_class, 2) for r, w in pairs]
        )
    return out


def expected_at(table: dict | None, new_classes: int, new_class_scale: float) -> dict | None:
    """The rates of an :func:`expected_rates` table for ``new_classes`` at ``new_class_scale``, or ``None``.

    Takes the table's count nearest to ``new_classes`` (by ratio), interpolates its rates between its scales
    (``None`` outside them) and keeps its whole curve, so a user can pick the scale for the precision they need.
    """
    if not table or not table.get("new_classes"):
        return None
    scales, i = table["scales"], _nearest_count(table, new_classes)
    out = {"new_classes": new_classes, "simulated_new_classes": table["new_classes"][i]}
    out["new_class_scale"] = new_class_scale
    for key in ("recall", "precision", "stolen_per_class"):
        inside = scales[0] <= new_class_scale <= scales[-1]
        value = _interpolate(new_class_scale, scales, table[key][i]) if inside else None
        out[key] = None if value is None else round(value, 2)
    out["curve"] = {"scales": scales, "recall": table["recall"][i], "precision": table["precision"][i]}
    return out


def scale_for_precision(table: dict | None, new_classes: int, target: float) -> tuple[float, bool] | None:
    """The largest ``new_class_scale`` up to 1 whose expected precision (%) for ``new_classes`` reaches ``target``,
    and whether one does; ``None`` without an :func:`expected_rates` table.

    Between two simulated scales the crossing is interpolated (to 4 decimals). Never above 1: a precision target
    only ever trades the calibration's balance for fewer wrong wins. Where no scale reaches ``target`` the most
    precise one is returned (``False``), so a new class fires as rarely as the curve allows.
    """
    if not table or not table.get("new_classes"):
        return None
    precision = table["precision"][_nearest_count(table, new_classes)]
    points = [(s, p) for s, p in zip(table["scales"], precision, strict=True) if p is not None]
    if not points:
        return None
    reaching = [i for i, (_, p) in enumerate(points) if p >= target]
    if not reaching:
        return min(max(points, key=lambda point: point[1])[0], 1.0), False
    j = reaching[-1]
    if j == len(points) - 1:
        return min(points[j][0], 1.0), True
    (low, above), (high, below) = points[j], points[j + 1]
    return min(round(low + (above - target) / (above - below) * (high - low), 4), 1.0), True


def _nearest_count(table: dict, new_classes: int) -> int:
    """The index of the table's simulated number of new classes nearest to ``new_classes`` (by ratio)."""
    counts = table["new_classes"]
    return min(range(len(counts)), key=lambda j: abs(math.log(counts[j] / new_classes)))


def _interpolate(x: float, xs: Sequence[float], ys: Sequence[float | None]) -> float | None:
    """``ys`` at ``x``, linear between the increasing ``xs`` (``xs[0] <= x <= xs[-1]``); ``None`` where undefined."""
    j = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    low, high = ys[j - 1], ys[j]
    if x == xs[j]:
        return None if high is None else float(high)
    if low is None or high is None:
        return None
    return float(low + (x - xs[j - 1]) / (xs[j] - xs[j - 1]) * (high - low))
