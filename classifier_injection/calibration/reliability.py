"""How far to trust each new class: expected precision and recall from the simulation, and its neighbours.

A new row predicted from text is a blend of its neighbours' rows, and the closer it sits to one old row the more
of that class's photos it takes. The ``synthesize`` rule's simulation measures this on the head's own classes:
each held-out row, calibrated as the real new rows will be, is scored alone against the kept rows on the
synthesised features, or on the rows' own directions without statistics (recall on its class's features;
precision against the kept classes' features it wins).
:func:`reliability_table` bins those rows by their cosine to the nearest kept row, a statistic of the head
alone; :func:`assess` gives a new class the rates of its bin and the old classes nearest to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..injector import top_cosines
from .simulation import held_mask, prototype_scores, synthetic_scores

__all__ = [
    "BINS",
    "assess",
    "least_reliable",
    "nearest_cosines",
    "prototype_wins",
    "reliability_table",
    "synthetic_wins",
]

#: Quantile bins of the nearest-row cosine over the simulated rows.
BINS = 5


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


def prototype_wins(
    seen_rows: torch.Tensor, held_out: torch.Tensor, predicted_rows: torch.Tensor, factor: float
) -> torch.Tensor:
    """``[N, H]``: as :func:`synthetic_wins` on the rows' own directions as features (biases left out)."""
    old, new = prototype_scores(seen_rows, held_out, predicted_rows)
    return factor * new > old.max(dim=1).values[:, None]


def reliability_table(
    wins: torch.Tensor,
    labels: torch.Tensor,
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
) -> dict:
    """Recall and precision (%) of simulated rows per bin of their nearest-kept-row cosine; JSON-able.

    Args:
        wins: ``[M, H]`` from :func:`synthetic_wins` or :func:`prototype_wins` (each row scored alone).
        labels: the class ``[M]`` of each scored feature.
        seen_rows: the simulated head ``[N, D + 1]``.
        held_out: the held-out classes ``[H]``; ``predicted_rows`` ``[H, D + 1]`` are their simulated rows.
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
        recall.append(round(100 * tp / n, 1) if n else None)
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

    The simulation ranks rows better than it rates them (on photos every bin is less precise than simulated), so
    what it says with confidence is which new classes are the weakest of an injection.
    """
    rated = [p for p in (table or {}).get("precision", []) if p is not None]
    if len(rated) < 2 or min(rated) == max(rated):
        return []
    return [i for i, e in enumerate(entries) if e.get("expected_precision") == min(rated)]
