"""Does the calibration's simulation predict the user regime, and where would a precision-first scale land?

For each model and name regime, ``inject()`` adds one name to the full 1000-class head with the library defaults,
its calibration simulated anew. The default rule's own simulated injection (the 200 held-out classes, their
predicted rows) is then scored as the benchmark's user regime scores photos (``expected_rates``): groups of ``K``
held-out rows injected among all the other ``1000 - K`` true rows, calibrated as ``inject()`` calibrates them,
their logits times ``new_class_scale``, on the features the rule's expected rates use (``--neighbour-share``: the
share of their climb's target on their class's nearest rows; 0 gives the features the factor is chosen on).
Side by side: the photos' numbers of the benchmark's latest user-regime runs of the current rows
(:data:`PHOTO_RUNS`; same models, regimes, ``K`` and scales), and the scale a precision-first rule (the best
simulated F0.5, at most 1) would choose. Image-free on the simulated side; the photo columns only report.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.operating_point
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from benchmarks.harness.calibration import recorded_injection
from benchmarks.harness.data import MODELS, RESULTS
from benchmarks.harness.results import command_line, record, study_parser
from benchmarks.harness.user_regime import REGIMES
from classifier_injection.calibration import SynthesizedCalibration
from classifier_injection.calibration.base import CalibrationContext

STUDY = "operating_point"
COUNTS = (1, 10, 50)
#: Scales of the table (those of the user regime's curve) and the candidates of the precision-first rule.
SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
CANDIDATES = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
#: The benchmark's runs whose ICIS rows are the current defaults' (the first that has a case is used).
PHOTO_RUNS = ("user-no-new-descriptors", "user-leave-out-lite12", "user-current-k1-k50")


def f_half(precision: float, recall: float) -> float:
    """F0.5: precision weighted twice as much as recall (0 when both are 0 or precision is undefined)."""
    if math.isnan(precision) or precision + recall == 0:
        return 0.0
    return 1.25 * precision * recall / (0.25 * precision + recall)


def simulated_rates(
    rule: SynthesizedCalibration, context: CalibrationContext, factor: float, k: int, scales: Sequence[float]
) -> list[dict]:
    """Recall, precision (%) and old features stolen per new row when ``k`` simulated rows join the true ones."""
    table = rule.expected(context, factor, counts=(k,), scales=scales)
    return [
        {
            "scale": scale,
            "recall": table["recall"][0][i],
            "precision": math.nan if table["precision"][0][i] is None else table["precision"][0][i],
            "stolen_per_class": table["stolen_per_class"][0][i],
        }
        for i, scale in enumerate(table["scales"])
    ]


def precision_first(rates: Sequence[dict]) -> float:
    """The candidate scale with the best simulated F0.5 (ties: the larger scale)."""
    return max(rates, key=lambda r: (round(f_half(r["precision"], r["recall"]), 6), r["scale"]))["scale"]


def photo_curve(model: str, k: int, regime: str) -> tuple[str, list[dict | None]] | None:
    """The photos' points of ICIS at :data:`SCALES` in the first of :data:`PHOTO_RUNS` that measured the case."""
    path = RESULTS / "benchmark" / "results.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    for run in PHOTO_RUNS:
        try:
            curve = runs[run]["results"]["user"][model][str(k)][regime]["icis"]["curve"]
        except KeyError:
            continue
        points = {point["scale"]: point for point in curve}
        return run, [points.get(scale) for scale in SCALES]
    return None


def measure(model_name: str, regime: str, neighbour_share: float) -> dict:
    """Simulated rates at each ``K`` of :data:`COUNTS`, the precision-first scale, and the photos' rates."""
    rule = SynthesizedCalibration(neighbour_share=neighbour_share)
    context, choice = recorded_injection(model_name, regime, rule)
    out: dict = {"factor": choice.factor, "offset": choice.offset, "neighbour_share": neighbour_share, "counts": {}}
    for k in COUNTS:
        rates = simulated_rates(rule, context, choice.factor, k, SCALES)
        chosen = precision_first(simulated_rates(rule, context, choice.factor, k, CANDIDATES))
        photos = photo_curve(model_name, k, regime)
        out["counts"][str(k)] = {
            "simulated": rates,
            "precision_first_scale": chosen,
            "photos": None if photos is None else photos[1],
            "photo_run": None if photos is None else photos[0],
        }
    return out


def _cell(point: dict | None) -> str:
    if point is None:
        return "-"
    precision = "-" if math.isnan(point["precision"]) else f"{point['precision']:.0f}"
    return f"{point['recall']:.0f} / {precision}"


def table(results: dict) -> str:
    """Markdown: per model, regime and K, simulated and photo recall / precision at each scale."""
    lines = [
        "### Recall / precision (%) by new_class_scale: the simulation scored as the user regime, and photos",
        "",
        "| model | regime | K | | " + " | ".join(f"{s:g}" for s in SCALES) + " | precision-first scale |",
        "|---|---|---|---|" + "---|" * len(SCALES) + "---|",
    ]
    for model, regimes in results.items():
        for regime, entry in regimes.items():
            for k, data in entry["counts"].items():
                simulated = " | ".join(_cell(p) for p in data["simulated"])
                lines.append(
                    f"| {model} | {regime} | {k} | simulated | {simulated} | {data['precision_first_scale']:g} |"
                )
                if data["photos"] is not None:
                    photos = " | ".join(_cell(p) for p in data["photos"])
                    lines.append(f"| | | | photos (run `{data['photo_run']}`) | {photos} | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.operating_point") -> dict:
    parser = study_parser(prog, __doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument(
        "--neighbour-share",
        type=float,
        default=SynthesizedCalibration.neighbour_share,
        help="share of the simulated features' climb target on their class's nearest rows (0: the factor's features)",
    )
    parser.add_argument("--name", default=STUDY, help="run name in benchmarks/results/operating_point")
    args = parser.parse_args(argv)
    share = args.neighbour_share
    results = {model: {regime: measure(model, regime, share) for regime in args.regimes} for model in args.models}
    text = table(results)
    print(text)
    record(
        STUDY,
        args.name,
        results,
        text,
        command_line(prog, argv),
        title="The operating point: simulation against photos",
    )
    return results


if __name__ == "__main__":
    main()
