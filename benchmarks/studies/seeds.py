"""How far the 5-fold protocol moves with the seed alone, and whether two methods differ beyond it.

Each seed reruns the main benchmark's protocol (one model, ``minilm-default``, 5 folds, 200 held-out classes
each) with everything random seeded by it: the injector's own seed and ``inject()``'s (the calibration's
held-out classes). Per method: ZSL / H per seed, their mean and standard deviation over the seeds, and each
method's difference from the first one, seed by seed. Seed 0 is the main benchmark's.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.seeds --methods icis icis-no-row-encoder
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from benchmarks.harness.data import fold_classes, head_data
from benchmarks.harness.descriptors import fold_descriptors
from benchmarks.harness.methods import METHODS, run_method
from benchmarks.harness.results import command_line, record, study_parser

STUDY = "seeds"
SOURCE = "minilm-default"
FOLDS = 5


def seeded(method: str, seed: int) -> object:
    """``method``'s injector with its own seed set to ``seed``."""
    injector = METHODS[method].build()
    if not hasattr(injector, "seed"):
        raise ValueError(f"method {method!r} has no seed to vary; choose ICIS or one of its variants")
    injector.seed = seed
    return injector


def protocol(model: str, method: str, seed: int) -> dict:
    """Mean ZSL and H (%) over the 5 folds, and the per-fold values, of ``method`` with every seed set to ``seed``."""
    data = head_data(model)
    folds = []
    for fold in range(FOLDS):
        held = fold_classes(fold)
        result = run_method(
            data, held, fold_descriptors(SOURCE, held), seeded(method, seed), METHODS[method].calibration, seed=seed
        )
        folds.append({"zsl": result["zsl"], "h": result["h"], "fit_seconds": result["fit_seconds"]})
    return {
        "zsl": statistics.fmean(f["zsl"] for f in folds),
        "h": statistics.fmean(f["h"] for f in folds),
        "folds": folds,
    }


def table(results: dict, seeds: Sequence[int]) -> str:
    """Markdown: ZSL / H per seed, mean and deviation over the seeds, mean difference from the first method."""
    lines = [
        "##### ZSL / H (%) per seed, 5 folds each",
        "",
        "| model | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sd | vs first method |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for model, methods in results.items():
        first = next(iter(methods.values()))
        for method, runs in methods.items():
            cells = " | ".join(f"{runs[str(s)]['zsl']:.1f} / {runs[str(s)]['h']:.1f}" for s in seeds)
            mean = {m: statistics.fmean(runs[str(s)][m] for s in seeds) for m in ("zsl", "h")}
            sd = {m: statistics.stdev(runs[str(s)][m] for s in seeds) if len(seeds) > 1 else 0.0 for m in mean}
            diff = {m: [runs[str(s)][m] - first[str(s)][m] for s in seeds] for m in mean}
            wins = sum(d > 0 for d in diff["h"])
            versus = (
                "-"
                if runs is first
                else f"{statistics.fmean(diff['zsl']):+.2f} / {statistics.fmean(diff['h']):+.2f} "
                f"(H higher on {wins} of {len(seeds)} seeds)"
            )
            lines.append(
                f"| {model} | {method} | {cells} | {mean['zsl']:.2f} / {mean['h']:.2f} | "
                f"{sd['zsl']:.2f} / {sd['h']:.2f} | {versus} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.seeds") -> dict:
    parser = study_parser(prog, __doc__)
    parser.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0"])
    parser.add_argument("--methods", nargs="+", default=["icis"], choices=sorted(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--name", default=STUDY, help="run name in benchmarks/results/seeds")
    args = parser.parse_args(argv)
    results: dict = {}
    for model in args.models:
        results[model] = {}
        for method in args.methods:
            results[model][method] = {}
            for seed in args.seeds:
                run = protocol(model, method, seed)
                results[model][method][str(seed)] = run
                print(f"{model} {method} seed {seed}: ZSL {run['zsl']:.1f} H {run['h']:.1f}", flush=True)
    text = table(results, args.seeds)
    print(text)
    record(STUDY, args.name, results, text, command_line(prog, argv), title="The 5-fold protocol against the seed")
    return results


if __name__ == "__main__":
    main()
