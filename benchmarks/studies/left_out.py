"""Image-free: how the calibration's choice moves when its simulation reuses the injection's fit.

On each fold head of the 5-fold protocol (its 800 seen classes; ``minilm-default``), one ICIS fit; then each rule
chooses its norm factor with a simulation that refits a fresh injector on the kept classes, and with the fit's own
predictions of the held-out classes, their rows left out of its blends, for every candidate
``left_out_correction``. A factor depends on the seen classes only: no photo is involved. The library's corrections
are the candidates whose factors best match the refit's.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.left_out
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from benchmarks.harness.data import fold_classes, head_data
from benchmarks.harness.descriptors import fold_descriptors
from benchmarks.harness.metrics import check_fold, seen_mask
from benchmarks.harness.results import command_line, record, study_parser
from classifier_injection import ICISInjector
from classifier_injection.calibration import SimulatedCalibration, SynthesizedCalibration
from classifier_injection.core import calibration_context, copying_factory

STUDY = "left_out"
SOURCE = "minilm-default"
#: Candidate corrections per rule: points off ``max_seen_drop`` (synthesize), off ``tolerance`` (simulate).
CORRECTIONS = {"synthesize": (0.0, 0.5, 1.0, 1.5, 2.0), "simulate": (0.0, 0.025, 0.05)}
RULES = {"synthesize": SynthesizedCalibration, "simulate": SimulatedCalibration}


def factors(model: str, fold: int) -> dict[str, float]:
    """The factor of every rule on one fold head: ``"<rule> refit"`` and ``"<rule> left-out <correction>"``."""
    data = head_data(model)
    held = check_fold(data, fold_classes(fold))
    descriptors = fold_descriptors(SOURCE, fold_classes(fold))
    seen = seen_mask(len(data.rows), held)
    rows, seen_descriptors, new_descriptors = data.rows[seen], descriptors[seen], descriptors[held]
    injector = ICISInjector(seed=0)
    factory = copying_factory(injector)
    with torch.random.fork_rng(devices=[]):  # seeded as predict_rows seeds the fit
        torch.manual_seed(0)
        injector.fit(seen_descriptors, rows, new_descriptors)
    predicted = injector.predict(new_descriptors)
    out: dict[str, float] = {}
    for simulation, fitted in (("refit", None), ("left-out", lambda: injector)):
        context = calibration_context(
            rows,
            predicted,
            seen_descriptors,
            new_descriptors,
            factory,
            features=data.statistics(),
            fitted_injector=fitted,
        )
        for name, rule in RULES.items():
            if simulation == "refit":
                out[f"{name} refit"] = rule().select(context).factor
                continue
            for correction in CORRECTIONS[name]:
                out[f"{name} left-out {correction:g}"] = rule(left_out_correction=correction).select(context).factor
    return out


def table(results: dict[str, dict[str, float]]) -> str:
    """Markdown: per rule and correction, how often and by how much the left-out factor differs from the refit's."""
    heads = list(results.values())
    lines = [
        f"##### Left-out factors against the refit's, {len(heads)} fold heads",
        "",
        "| rule | left_out_correction | equal | mean difference | mean absolute difference |",
        "|---|---|---|---|---|",
    ]
    for name, corrections in CORRECTIONS.items():
        for correction in corrections:
            diff = [head[f"{name} left-out {correction:g}"] - head[f"{name} refit"] for head in heads]
            equal = sum(abs(d) < 1e-9 for d in diff)
            lines.append(
                f"| {name} | {correction:g} | {equal} of {len(diff)} | {statistics.fmean(diff):+.4f} | "
                f"{statistics.fmean(abs(d) for d in diff):.4f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.left_out") -> dict:
    parser = study_parser(prog, __doc__)
    default_models = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
    parser.add_argument("--models", nargs="+", default=default_models)
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--name", default=STUDY, help="run name in benchmarks/results/left_out")
    args = parser.parse_args(argv)
    results = {}
    for model in args.models:
        for fold in args.folds:
            results[f"{model} fold {fold}"] = factors(model, fold)
            print(f"{model} fold {fold}: {results[f'{model} fold {fold}']}", flush=True)
    text = table(results)
    print(text)
    title = "The calibration's choice with the injection's own fit against a refit"
    record(STUDY, args.name, results, text, command_line(prog, argv), title=title)
    return results


if __name__ == "__main__":
    main()
