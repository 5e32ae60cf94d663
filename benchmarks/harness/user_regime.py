"""The user regime: a few classes removed from a real head and injected back by name through ``inject()``.

A draw removes ``K`` classes from the 1000 of an ImageNet model and keeps a model whose head has the other
``1000 - K`` (its ``label_names`` their WordNet ids, as a head on a subset of ImageNet). The removed classes are
injected back by name (their first WordNet lemma) with the public :func:`classifier_injection.inject`, as a user
adds their own classes, and the grown head is scored on all 1000 photos (one per class), full-size:

* recall: a new class's photo is top-1 for it; top-5 recall: it is among the top 5;
* precision: when a new class is top-1, it is the photo's own class (pooled over the draws);
* stolen: photos of old classes whose top-1 became a new class, per new class;
* old-class change: accuracy on the old classes' photos, grown head minus the head before the injection (points).

Two name regimes: ``wordnet`` (the default: new names looked up in WordNet, seen classes described by their
definitions) and ``name-only`` (every class by its name alone: what a user's names that WordNet lacks get). The
``ceiling`` puts the true rows back. Draw ``d`` of any ``K`` removes the first ``K`` distinct names of
``numpy.random.RandomState(777 + d).permutation(1000)``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness.data import HeadData, head_data, load_model
from benchmarks.harness.descriptors import embedding_cache, imagenet_classes
from classifier_injection import DescriptorConfig, InjectionConfig, find_head, inject
from classifier_injection.calibration import SynthesizedCalibration
from classifier_injection.calibration.base import feature_mean_biases, mean_norm

__all__ = [
    "CURVE_SCALES",
    "DRAW_SEED",
    "REGIMES",
    "RULE_OFFSET",
    "SCALES",
    "TARGET_PRECISIONS",
    "Draw",
    "add_draw_arguments",
    "calibrated",
    "curve_rates",
    "curve_summary",
    "curve_table",
    "draw_classes",
    "grown_labels",
    "inject_draw",
    "reduced_model",
    "run_cases",
    "score_head",
    "score_rows",
    "summarize",
]

#: Draw ``d`` uses ``RandomState(DRAW_SEED + d)``.
DRAW_SEED = 777
#: The name regimes and the descriptor config each runs ``inject()`` with (``None``: the library default).
REGIMES: dict[str, DescriptorConfig | None] = {"wordnet": None, "name-only": DescriptorConfig.from_preset("name")}
#: ``new_class_scale`` values of the precision-recall curve (the rows' logits times the scale).
SCALES: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0)
#: ``new_class_scale`` values of the fine curves (:func:`curve_summary`) (the rows' logits times the scale).
CURVE_SCALES = tuple(round(0.5 + 0.05 * i, 2) for i in range(41))
#: The default rule's offset on the feature-mean bias (logits).
RULE_OFFSET = SynthesizedCalibration().offset
#: Precision levels of the issue's targets (names WordNet knows: 50 %, names it lacks: 35 %).
TARGET_PRECISIONS = (50.0, 35.0)
#: Counts a draw is scored by (summed over draws before they become rates).
COUNTS = (
    "new_photos",
    "hits",
    "top5_hits",
    "new_wins",
    "right_wins",
    "stolen",
    "old_photos",
    "old_before",
    "old_after",
)


def draw_classes(k: int, draw: int, num_classes: int = 1000) -> np.ndarray:
    """The ``k`` classes removed in draw ``draw`` (sorted): the first ``k`` distinct names of the seeded permutation.

    Names are compared as ``inject()`` compares them (ignoring case), so a draw never holds both of ImageNet's
    "crane"s.
    """
    if not 1 <= k < num_classes:
        raise ValueError(f"k must be in [1, {num_classes}), got {k}")
    names, _ = imagenet_classes()
    chosen: list[int] = []
    keys: set[str] = set()
    for c in np.random.RandomState(DRAW_SEED + draw).permutation(num_classes):
        key = " ".join(names[c].split()).casefold()
        if key not in keys:
            keys.add(key)
            chosen.append(int(c))
        if len(chosen) == k:
            break
    return np.sort(np.array(chosen))


@dataclass(frozen=True)
class Draw:
    """One draw: the model, the removed classes, their names, and which photos are whose in the grown head."""

    model_name: str
    k: int
    draw: int
    removed: np.ndarray  # sorted class indices of the 1000
    names: list[str]  # their names, the order of the new rows

    @property
    def kept(self) -> torch.Tensor:
        mask = torch.ones(1000, dtype=torch.bool)
        mask[torch.as_tensor(self.removed)] = False
        return mask

    def grown_labels(self) -> torch.Tensor:
        """Class ``c``'s index in the grown head: kept classes in their order, then the new ones."""
        return grown_labels(1000, torch.as_tensor(self.removed))


def grown_labels(num_classes: int, new_classes: torch.Tensor) -> torch.Tensor:
    """Class ``c``'s index in a head of the other classes (in their order) grown by ``new_classes`` (in that order)."""
    is_new = torch.zeros(num_classes, dtype=torch.bool)
    is_new[new_classes] = True
    index = torch.empty(num_classes, dtype=torch.long)
    index[~is_new] = torch.arange(num_classes - len(new_classes))
    index[new_classes] = num_classes - len(new_classes) + torch.arange(len(new_classes))
    return index


def add_draw_arguments(parser: argparse.ArgumentParser, models: Sequence[str], draws: int, study: str) -> None:
    """A study's options over user-regime draws: ``--models``, ``--regimes``, ``--k``, ``--draws`` and ``--name``."""
    parser.add_argument("--models", nargs="+", default=list(models))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--k", type=int, default=10, help="classes removed and injected back per draw")
    parser.add_argument("--draws", type=int, default=draws, help="draws per model and regime")
    parser.add_argument("--name", default=study, help=f"run name in benchmarks/results/{study}")


def run_cases(args: argparse.Namespace, measure: Callable[[str, str], dict]) -> dict:
    """``{"MODEL, K = k": {regime: measure(model, regime)}}`` over the options of :func:`add_draw_arguments`."""
    results: dict = {}
    for model_name in args.models:
        for regime in args.regimes:
            entry = measure(model_name, regime)
            results.setdefault(f"{model_name}, K = {args.k}", {})[regime] = entry
            print(f"{model_name} {regime}: done", flush=True)
    return results


def make_draw(model_name: str, k: int, draw: int) -> Draw:
    removed = draw_classes(k, draw)
    names, _ = imagenet_classes()
    return Draw(model_name, k, draw, removed, [names[c] for c in removed])


@functools.cache
def _full_model(model_name: str) -> nn.Module:
    return load_model(model_name).eval()


def reduced_model(draw: Draw) -> nn.Module:
    """The model without the removed classes: a ``1000 - K``-class head, ``label_names`` its WordNet ids."""
    model = copy.deepcopy(_full_model(draw.model_name))
    rows = find_head(model).rows(model)
    kept = draw.kept
    _, wnids = imagenet_classes()
    model.reset_classifier(int(kept.sum()))
    layer = model.get_classifier()
    with torch.no_grad():
        layer.weight.copy_(rows[kept, :-1])
        layer.bias.copy_(rows[kept, -1])
    labels = [w for w, keep in zip(wnids, kept.tolist(), strict=True) if keep]
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": labels, "num_classes": len(labels)}
    return model.eval()


def inject_draw(
    draw: Draw, regime: str, injector=None, embedder=None, seed: int = 0, calibration=None
) -> tuple[torch.Tensor, dict]:
    """The new rows ``[K, D + 1]`` that ``inject()`` puts in the reduced model's head (``injector=None``: ICIS;
    ``calibration=None``: the default rule), and its record of the injection."""
    model = reduced_model(draw)
    config = InjectionConfig(descriptors=REGIMES[regime], allow_existing=True, calibration=calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the unreliable-class warning: its record is kept instead
        grown = inject(
            model, draw.names, config, injector=injector, embedder=embedder, cache=embedding_cache(), seed=seed
        )
    rows = find_head(grown).rows(grown)
    before = find_head(model).rows(model)
    if not torch.equal(rows[: len(before)], before):
        raise RuntimeError("inject() changed the old rows")
    return rows[len(before) :], grown.classifier_injection["injections"][-1]


def calibrated(
    directions: torch.Tensor, old_rows: torch.Tensor, feature_mean: torch.Tensor, factor: float = 1.0
) -> torch.Tensor:
    """Rows ``[K, D + 1]`` along ``directions [K, D]``, calibrated as the default rule does at ``factor``: weights
    ``factor`` x the old rows' mean norm, bias the feature-mean bias plus :data:`RULE_OFFSET`."""
    weights = F.normalize(directions.float(), dim=1) * mean_norm(old_rows) * factor
    biases = feature_mean_biases(weights, old_rows, feature_mean) + RULE_OFFSET
    return torch.cat([weights, biases[:, None].to(weights.dtype)], 1)


@torch.no_grad()
def score_head(
    photos: HeadData,
    old_rows: torch.Tensor,
    new_rows: torch.Tensor,
    target: torch.Tensor,
    scales: Sequence[float] = SCALES,
    offsets: torch.Tensor | None = None,
) -> tuple[dict[str, dict[str, int]], list[dict[str, int]] | None]:
    """Counts (:data:`COUNTS`) per ``new_class_scale`` of a head of ``old_rows`` grown by ``new_rows`` (scaled as
    ``inject()`` scales them) on every photo, ``target [photos]`` their classes in the grown head; and per new
    class at scale 1 (``None`` if 1 is not among ``scales``): its photo won (``hit``, 0 / 1) and the photos it won
    in all (``wins``). ``offsets [photos]``: a logit added to every new class's on that photo, after scaling."""
    is_new = target >= len(old_rows)
    old_logits = photos.logits(old_rows)
    before = old_logits.argmax(1) == target
    out: dict = {}
    per_class = None
    for scale in scales:
        new_logits = photos.logits(new_rows.to(photos.rows.dtype) * scale)
        if offsets is not None:
            new_logits = new_logits + offsets.to(new_logits.dtype)[:, None]
        logits = torch.cat([old_logits, new_logits], dim=1)
        predicted = logits.argmax(1)
        wins = predicted >= len(old_rows)
        right = predicted == target
        top5 = (logits.topk(5, dim=1).indices == target[:, None]).any(1)
        out[str(scale)] = {
            "new_photos": int(is_new.sum()),
            "hits": int((right & is_new).sum()),
            "top5_hits": int((top5 & is_new).sum()),
            "new_wins": int(wins.sum()),
            "right_wins": int((wins & right).sum()),
            "stolen": int((wins & ~is_new).sum()),
            "old_photos": int((~is_new).sum()),
            "old_before": int((before & ~is_new).sum()),
            "old_after": int((right & ~is_new).sum()),
        }
        if scale == 1.0:
            per_class = _per_class(predicted, target, len(old_rows), len(new_rows))
    return out, per_class


def score_rows(draw: Draw, new_rows: torch.Tensor, scales: Sequence[float] = SCALES) -> dict[str, dict[str, int]]:
    """The draw's counts (:data:`COUNTS`) per ``new_class_scale`` (as ``inject()`` scales rows), and ``per_class``."""
    data: HeadData = head_data(draw.model_name)
    kept = draw.kept
    target = draw.grown_labels()[data.labels]
    out, per_class = score_head(data, data.rows[kept], new_rows, target, scales)
    if per_class is not None:
        out["per_class"] = per_class
    return out


def _per_class(predicted: torch.Tensor, target: torch.Tensor, num_old: int, k: int) -> list[dict[str, int]]:
    """Per new class (classes ``num_old .. num_old + k - 1``): its photo won (0/1), and how many photos it won."""
    photo = {int(t): i for i, t in enumerate(target.tolist()) if t >= num_old}
    return [
        {"hit": int(predicted[photo[num_old + j]] == num_old + j), "wins": int((predicted == num_old + j).sum())}
        for j in range(k)
    ]


def f1(rates: dict[str, float]) -> float:
    """The F1 (%) of :func:`summarize`'s recall and precision; 0 where either is 0 or undefined."""
    recall, precision = rates["recall"], rates["precision"]
    if not recall or not precision or math.isnan(precision):
        return 0.0
    return 2 * recall * precision / (recall + precision)


def summarize(counts: Sequence[dict[str, int]]) -> dict[str, float]:
    """Rates (%) pooled over draws: recall, precision, top-5 recall, stolen per new class, old-class change."""
    total = {key: sum(c[key] for c in counts) for key in COUNTS}
    new, old = max(total["new_photos"], 1), max(total["old_photos"], 1)
    return {
        "recall": 100 * total["hits"] / new,
        "precision": 100 * total["right_wins"] / total["new_wins"] if total["new_wins"] else float("nan"),
        "top5_recall": 100 * total["top5_hits"] / new,
        "stolen_per_class": total["stolen"] / new,
        "old_change": 100 * (total["old_after"] - total["old_before"]) / old,
        "draws": len(counts),
    }


def curve_rates(per_draw: list[dict], scales: Sequence[float] = CURVE_SCALES) -> dict[float, dict[str, float]]:
    """:func:`summarize`'s rates at each of ``scales``, pooled over the draws' counts."""
    return {scale: summarize([counts[str(scale)] for counts in per_draw]) for scale in scales}


def curve_summary(per_draw: list[dict], cosines: list[float], scales: Sequence[float] = CURVE_SCALES) -> dict:
    """Rates at scale 1, the highest recall at each target precision, and the best F1 over ``scales``."""
    rates = curve_rates(per_draw, scales)
    out = {"cosine": sum(cosines) / len(cosines), "at_1": rates[1.0]}
    for level in TARGET_PRECISIONS:
        reached = [r["recall"] for r in rates.values() if r["precision"] >= level]
        out[f"recall_at_precision_{level:g}"] = max(reached) if reached else None
    best = max(rates, key=lambda scale: f1(rates[scale]))
    out["best_f1"], out["best_f1_scale"] = f1(rates[best]), best
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def curve_table(heading: str, regimes: Sequence[str], result: dict, scales: Sequence[float] = CURVE_SCALES) -> str:
    """Markdown under ``heading``: one line per row family (``regimes``: those whose shared nearest rows to report),
    scored over ``scales``."""
    levels = " | ".join(f"highest recall at precision >= {level:g} %" for level in TARGET_PRECISIONS)
    effective = result.get("best blend's effective rows")
    lines = [
        f"##### {heading}",
        "",
        f"Recall / precision / top-5 recall in %, pooled over the draws; scales {scales[0]}-"
        f"{scales[-1]} in steps of {scales[1] - scales[0]:.2g}."
        + (
            ""
            if effective is None
            else f" The best blend of all kept rows has {effective:.0f} effective rows "
            "(`1 / sum(w^2)`, mean over the new classes)."
        )
        + "".join(
            f" {regime}: ICIS's row has {result[f'{regime}: shared nearest rows']:.2f} of the 5 kept rows nearest the "
            "true row among its own 5 nearest."
            for regime in regimes
        ),
        "",
        "| rows | cosine to the true row | at scale 1: recall / precision / top-5 recall | stolen per class | "
        f"{levels} | best F1 (scale) |",
        "|---|---|---|---|" + "---|" * len(TARGET_PRECISIONS) + "---|",
    ]
    for name, s in result["families"].items():
        at_1 = s["at_1"]
        reached = " | ".join(_cell(s[f"recall_at_precision_{level:g}"]) for level in TARGET_PRECISIONS)
        lines.append(
            f"| {name} | {s['cosine']:.3f} | {_cell(at_1['recall'])} / {_cell(at_1['precision'])} / "
            f"{_cell(at_1['top5_recall'])} | {at_1['stolen_per_class']:.2f} | {reached} | "
            f"{s['best_f1']:.1f} ({s['best_f1_scale']:g}) |"
        )
    return "\n".join(lines)
