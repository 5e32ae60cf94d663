"""What a model without feature statistics is told about its new classes, against the photos.

``inject()`` estimates the mean and spread of the head's input from a BatchNorm's running statistics
(:mod:`classifier_injection.features`); models that end otherwise (ViTs, ConvNeXts, ResNets: most of timm) fall
back to the ``simulate`` rule, whose simulation scores its held-out rows on the rows' own directions
("prototypes") instead of synthesised features. This study measures, in the user regime
(:mod:`benchmarks.harness.user_regime`: ``K`` classes removed from the head and injected back by name), what that
simulation says each new class can expect (the rates of its bin of the nearest-kept-row cosine, as
:func:`~classifier_injection.calibration.reliability.assess` reads a table) and what the photos give:

* pooled over the draws: the mean expected precision / recall of the new classes, and the photos' rates;
* the new classes in thirds by expected precision: does the simulation at least rank them?
* the photos' rates at other ``new_class_scale`` values, the knob such a model's user has.

The EfficientNets stand in for such models: they are injected with the ``simulate`` rule and the old rows' mean
bias for the new rows, as if their statistics were hidden, so the rows and their calibration are what such a model
gets.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.prototype_rates
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from benchmarks.harness.calibration import RecordingSimulated, forget_choices, last_recorded, prototype_reliability
from benchmarks.harness.descriptors import imagenet_classes
from benchmarks.harness.results import command_line, record, study_parser
from benchmarks.harness.user_regime import (
    add_draw_arguments,
    inject_draw,
    make_draw,
    run_cases,
    score_rows,
    summarize,
)
from classifier_injection.calibration.reliability import assess

STUDY = "prototype_rates"
#: Draws of the user regime measured per regime (its plan's number for K = 10).
DRAWS = 8
#: ``new_class_scale`` values the photos are scored at: what the knob trades for such a model.
CURVE_SCALES = (0.8, 1.0, 1.2, 1.5, 2.0)


def measure_draw(model_name: str, k: int, draw: int, regime: str) -> tuple[list[dict], dict]:
    """Per new class of one draw: the prototype simulation's expected rates (%) and the photos' outcome at scale 1;
    and the draw's counts per ``new_class_scale`` (:func:`score_rows`)."""
    spec = make_draw(model_name, k, draw)
    forget_choices()  # the rule chooses anew
    rule = RecordingSimulated(bias="mean")  # the fallback's biases: a model without statistics has no feature mean
    rows, _ = inject_draw(spec, regime, calibration=rule)
    context, choice = last_recorded()
    table = prototype_reliability(context, rule, choice.factor)
    seen_names = [name for name, kept in zip(imagenet_classes()[0], spec.kept.tolist(), strict=True) if kept]
    entries = assess(rows, context.seen_rows, seen_names, table)
    counts = score_rows(spec, rows, CURVE_SCALES)
    outcomes = counts.pop("per_class")
    classes = [
        {
            "name": name,
            "expected_precision": entry.get("expected_precision"),
            "expected_recall": entry.get("expected_recall"),
            "factor": choice.factor,
            **outcome,
        }
        for name, entry, outcome in zip(spec.names, entries, outcomes, strict=True)
    ]
    return classes, counts


def measure(model_name: str, k: int, draws: int, regime: str) -> dict:
    """One model and regime over ``draws`` draws: every class, the :func:`summary`, and the photos' curve."""
    measured = [measure_draw(model_name, k, d, regime) for d in range(draws)]
    classes = [c for draw_classes, _ in measured for c in draw_classes]
    curve = {str(s): summarize([counts[str(s)] for _, counts in measured]) for s in CURVE_SCALES}
    return {"classes": classes, "summary": summary(classes), "curve": curve}


def summary(classes: Sequence[dict]) -> dict:
    """Expected (mean over classes) and measured (pooled) precision / recall in %, overall and in thirds."""

    def rates(members: Sequence[dict]) -> dict:
        wins = sum(c["wins"] for c in members)
        return {
            "classes": len(members),
            "expected_precision": float(np.mean([c["expected_precision"] or 0.0 for c in members])),
            "measured_precision": 100 * sum(c["hit"] for c in members) / wins if wins else float("nan"),
            "expected_recall": float(np.mean([c["expected_recall"] or 0.0 for c in members])),
            "measured_recall": 100 * float(np.mean([c["hit"] for c in members])),
        }

    rated = sorted((c for c in classes if c["expected_precision"] is not None), key=lambda c: c["expected_precision"])
    thirds = [rates([rated[i] for i in part]) for part in np.array_split(np.arange(len(rated)), 3)]
    return {"all": rates(rated), "thirds": thirds, "factors": sorted({c["factor"] for c in classes})}


def table(results: dict) -> str:
    """Markdown: expected against measured, per model, K and regime, overall and by thirds of expected precision."""
    lines = [
        "### Expected by the prototype simulation against the photos (scale 1; precision / recall %)",
        "",
        "| model, K | regime | classes | expected precision | measured precision | expected recall | measured recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, regimes in results.items():
        for regime, entry in regimes.items():
            for label, row in [("all", entry["summary"]["all"])] + [
                (f"third {i + 1}", third) for i, third in enumerate(entry["summary"]["thirds"])
            ]:
                lines.append(
                    f"| {case} | {regime}, {label} | {row['classes']} | {row['expected_precision']:.1f} | "
                    f"{row['measured_precision']:.1f} | {row['expected_recall']:.1f} | {row['measured_recall']:.1f} |"
                )
    lines += [
        "",
        "Thirds: the new classes sorted by expected precision, least first.",
        "",
        "### The photos at other new_class_scale values: recall / precision % (old photos taken per new class)",
        "",
        "| model, K | regime | " + " | ".join(str(scale) for scale in CURVE_SCALES) + " |",
        "|---|---|" + "---|" * len(CURVE_SCALES),
    ]
    for case, regimes in results.items():
        for regime, entry in regimes.items():
            cells = [
                f"{r['recall']:.1f} / {r['precision']:.1f} ({r['stolen_per_class']:.2f})"
                for r in (entry["curve"][str(scale)] for scale in CURVE_SCALES)
            ]
            lines.append(f"| {case} | {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.prototype_rates") -> dict:
    parser = study_parser(prog, __doc__)
    add_draw_arguments(parser, ["tf_efficientnet_lite0"], DRAWS, STUDY)
    args = parser.parse_args(argv)
    results = run_cases(args, lambda model, regime: measure(model, args.k, args.draws, regime))
    text = table(results)
    print(text)
    record(STUDY, args.name, results, text, command_line(prog, argv), title="Expected rates without feature statistics")
    return results


if __name__ == "__main__":
    main()
