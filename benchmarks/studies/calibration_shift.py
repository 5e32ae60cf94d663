"""How the default calibration's offset holds when the photos shift (issue 7: the offset's transfer).

The default rule adds a constant prior of ``offset = 1`` logit to every new row. What that costs the old classes
depends on how confident the model is on its photos: the less confident, the more old-class photos a constant
boost hands to new rows. Between lite0 and lite1 that confidence differs (median probability of the true class
0.82 vs 0.62), and offset 1 was chosen with lite1's test folds in view (``docs/decisions.md``). This study
asks the question without a fourth model: the same heads, the same calibrated rows (the rules see the head, never
a photo, so their choices do not change), scored on photos resized to other test resolutions, which moves the
models' confidence and accuracy the way a different model's photos would.

Per model, fold and test resolution (the model's own size and +-32 px): S, U, H and S drop of the default rule
and its offset variants (each with the budget chosen for its offset on lite0's seen classes), next to the norm
factor picked on those photos (upper bound only). Nothing here chooses anything.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.calibration_shift`` (ICIS fits shared with the
calibration study through ``benchmarks/.cache/calibration``; results: ``benchmarks/results/calibration_shift/``).

``--tune`` chooses the offset and its budget on lite0 alone, robustly to such shifts (:func:`tune_robust`):
the calibration study's inner split (160 of the 800 seen classes of each fold play the new classes; only
seen-class photos are scored), its photos taken at lite0's three test sizes. Per offset, the budget is the
largest whose inner ICIS S drop plus its standard error stays within 15 at *every* size; the offset kept is the
one with the highest inner H averaged over the sizes (ties: the smaller offset).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np
import torch

from benchmarks.harness.calibration import (
    OFFSET_VARIANTS,
    SYNTHESIZE_DROPS,
    SYNTHESIZE_OFFSETS,
    fold_context,
    fold_inputs,
    inner_split,
    inner_summary,
)
from benchmarks.harness.data import MODELS, head_data, load_model
from benchmarks.harness.descriptors import load_descriptors
from benchmarks.harness.metrics import evaluate_rows, mean_of, oracle, picked_on_test_photos
from benchmarks.harness.results import command_line, record, study_parser
from classifier_injection.calibration import SynthesizedCalibration, fit_calibration

STUDY = "calibration_shift"
TITLE = "Calibration under a shift of the photos (test resolution)"
SHIFTS = (-32, 0, 32)


def _native_size(model_name: str) -> int:
    import timm

    return timm.data.resolve_data_config({}, model=load_model(model_name))["input_size"][-1]


def _confidence(data) -> float:
    """Median probability the original head gives the true class of each photo."""
    probs = torch.softmax(data.logits(data.rows), dim=1)
    return float(probs[torch.arange(len(data.labels)), data.labels].median())


def run_model(model_name: str, descriptors, folds: Sequence[int], variants: dict) -> dict:
    photos = _shifted_photos(model_name)
    native = photos[_native_size(model_name)]
    out = {
        str(s): {
            "confidence": _confidence(d),
            "accuracy": 100 * float((d.logits(d.rows).argmax(1) == d.labels).float().mean()),
        }
        for s, d in photos.items()
    }
    for fold in folds:
        print(f"{model_name} fold {fold}", flush=True)
        held, predicted, context = fold_context(native, descriptors, fold, "icis")
        # Fitted on one context: the variants share its simulated injection and synthesised features.
        rows = {label: fit_calibration(rule, context)(predicted, context.seen_rows) for label, rule in variants.items()}
        for s, data in photos.items():
            result = {label: evaluate_rows(data, held, r) for label, r in rows.items()}
            result["test-picked"] = picked_on_test_photos(data, held, predicted, context.seen_rows)
            result["original"] = oracle(data, held)
            out[str(s)].setdefault("folds", []).append(result)
            print(f"  {s}px: " + ", ".join(f"{k} H {v['h']:.1f}" for k, v in result.items()), flush=True)
    return out


def _shifted_photos(model_name: str) -> dict[int, object]:
    size = _native_size(model_name)
    return {size + d: head_data(model_name) if d == 0 else head_data(model_name, image_size=size + d) for d in SHIFTS}


def tune_robust(descriptors, folds: Sequence[int], model_name: str = "tf_efficientnet_lite0") -> dict:
    """Offset and budget of ``synthesize`` chosen on seen classes of ``model_name`` at its three test sizes.

    Budget only (no floor), spread and confidence as the library's, ICIS rows: what ``--tune-synthesize`` measures,
    with the seen photos at each size. See the module docstring for the criterion.
    """
    photos = _shifted_photos(model_name)
    native = photos[_native_size(model_name)]
    table: dict[tuple, list[dict]] = {}
    for fold in folds:
        split = inner_split(native, descriptors, fold, "icis")
        seen_idx = torch.nonzero(fold_inputs(native, descriptors, fold)[1]).squeeze(1)
        subs = {size: data.restricted(seen_idx) for size, data in photos.items()}
        true_s = {size: evaluate_rows(sub, split.held, sub.rows[split.held])["seen"] for size, sub in subs.items()}
        for offset in SYNTHESIZE_OFFSETS:  # one simulated injection and feature synthesis, shared by the context
            for drop in SYNTHESIZE_DROPS:
                rule = SynthesizedCalibration(offset=offset, max_seen_drop=drop, floor_tolerance=None)
                fitted = rule.fit(split.context)
                rows = fitted(split.predicted, split.kept_rows)
                for size, sub in subs.items():
                    real = evaluate_rows(sub, split.held, rows)
                    entry = {"h": real["h"], "s_drop": true_s[size] - real["seen"], "factor": fitted.factor}
                    table.setdefault((offset, drop, size), []).append(entry)
        print(f"  robust tuning, fold {fold} done", flush=True)
    summary = inner_summary(table)
    sizes = sorted(photos)

    def worst(offset: float, drop: float) -> float:
        return max(summary[(offset, drop, s)]["s_drop"] + summary[(offset, drop, s)]["s_drop_se"] for s in sizes)

    def mean_h(offset: float, drop: float) -> float:
        return float(np.mean([summary[(offset, drop, s)]["h"] for s in sizes]))

    budgets = {}
    for offset in SYNTHESIZE_OFFSETS:
        within = [d for d in SYNTHESIZE_DROPS if worst(offset, d) <= 15]
        budgets[offset] = max(within, default=SYNTHESIZE_DROPS[0])
    chosen = max(SYNTHESIZE_OFFSETS, key=lambda o: (round(mean_h(o, budgets[o]), 6), -o))
    result = {
        "model": model_name,
        "sizes": sizes,
        "chosen": {"offset": chosen, "max_seen_drop": budgets[chosen]},
        "per_offset": {
            str(o): {"max_seen_drop": budgets[o], "mean_h": mean_h(o, budgets[o]), "worst_s_drop": worst(o, budgets[o])}
            for o in SYNTHESIZE_OFFSETS
        },
        "inner": [{"offset": k[0], "max_seen_drop": k[1], "size": k[2], **v} for k, v in sorted(summary.items())],
    }
    print(f"robust choice on {model_name}'s seen classes: {result['chosen']}", flush=True)
    return result


def summarise_tuning(tuning: dict) -> str:
    sizes = tuning["sizes"]
    rows = {(r["offset"], r["max_seen_drop"], r["size"]): r for r in tuning["inner"]}
    lines = [
        f"# `synthesize` offset and budget chosen on seen classes of {tuning['model']}, robust to the test size",
        "",
        "Inner split of `--tune-synthesize` (160 of each fold's 800 seen classes play the new classes; ICIS rows,",
        "budget only), the seen photos at each test size. Per offset: the largest budget whose S drop + standard",
        "error stays within 15 at every size; kept: the offset with the best H averaged over the sizes.",
        f"Chosen: {tuning['chosen']}. Per offset: "
        + "; ".join(
            f"{o}: budget {v['max_seen_drop']}, mean H {v['mean_h']:.1f}, worst S drop + se {v['worst_s_drop']:.1f}"
            for o, v in tuning["per_offset"].items()
        ),
        "",
        "| offset | max_seen_drop | " + " | ".join(f"{s} px H / S drop (se)" for s in sizes) + " | factor |",
        "|---|---|" + "---|" * (len(sizes) + 1),
    ]
    for offset in SYNTHESIZE_OFFSETS:
        for drop in SYNTHESIZE_DROPS:
            cells = [rows[(offset, drop, s)] for s in sizes]
            lines.append(
                f"| {offset} | {drop} | "
                + " | ".join(f"{c['h']:.1f} / {c['s_drop']:.1f} ({c['s_drop_se']:.1f})" for c in cells)
                + f" | {cells[0]['factor']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _variants(candidate: Sequence[float] | None) -> dict:
    """The rules scored: the default and its offset variants, or the default and one (offset, budget) candidate."""
    if candidate is None:
        return OFFSET_VARIANTS
    offset, budget = candidate
    label = f"synthesize, offset {offset:g}, budget {budget:g}"
    return {
        "synthesize": OFFSET_VARIANTS["synthesize"],
        label: SynthesizedCalibration(max_seen_drop=budget, offset=offset),
    }


def summarise(results: dict) -> str:
    variants = results.get("variants", list(OFFSET_VARIANTS))
    lines = [
        "# Calibration under a shift of the photos (test resolution)",
        "",
        "Same heads, same calibrated rows (ICIS, library-default descriptors), photos resized to other test",
        "resolutions. Per cell: mean over the folds of H / H as a share of the factor picked on those photos / S drop",
        "(the model's own accuracy on the seen photos minus S). `confidence`: median probability of the true class",
        "under the original head, over all 1000 photos.",
        "",
        "| model | test size | top-1 | confidence | " + " | ".join(variants) + " | test-picked H |",
        "|---|---|---|---|" + "---|" * (len(variants) + 1),
    ]
    for model, by_size in results["runs"].items():
        for size, entry in by_size.items():
            folds = entry["folds"]
            original = mean_of([f["original"] for f in folds], "seen")
            best = mean_of([f["test-picked"] for f in folds], "h")
            cells = []
            for label in variants:
                rows = [f[label] for f in folds]
                h, s = mean_of(rows, "h"), mean_of(rows, "seen")
                cells.append(f"{h:.1f} / {100 * h / best:.0f} % / {original - s:.1f}")
            lines.append(
                f"| {model} ({len(folds)} folds) | {size} px | {entry['accuracy']:.1f} | {entry['confidence']:.2f} | "
                + " | ".join(cells)
                + f" | {best:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.calibration_shift") -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = study_parser(prog, __doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", default=None, help="run name in benchmarks/results/calibration_shift")
    parser.add_argument("--tune", action="store_true", help="choose offset and budget on lite0's seen classes")
    parser.add_argument(
        "--candidate", nargs=2, type=float, metavar=("OFFSET", "BUDGET"), help="score this rule next to the default"
    )
    args = parser.parse_args(argv)
    command = command_line(prog, argv)
    descriptors = load_descriptors("default")
    if args.tune:
        tuning = tune_robust(descriptors, args.folds)
        record(STUDY, args.out or "tuning", tuning, summarise_tuning(tuning), command, title=TITLE)
        print(summarise_tuning(tuning))
        return
    variants = _variants(args.candidate)
    results = {"descriptors": "default", "shifts_px": list(SHIFTS), "variants": list(variants), "runs": {}}
    for model in args.models:
        results["runs"][model] = run_model(model, descriptors, args.folds, variants)
    record(STUDY, args.out or "calibration_shift", results, summarise(results), command, title=TITLE)
    print(summarise(results))


if __name__ == "__main__":
    main()
