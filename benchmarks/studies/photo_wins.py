"""How many of the simulation's wins photos give: the expected recall, against seen classes' photos.

The calibration's expected rates score its simulated injection (held-out old classes, their rows predicted by the
injection's own fit with their rows left out of its blends) on synthesised features. Their precision is close to
the photos', their recall far too high. This study measures why on each model and name regime, with the
default rule after one ``inject()`` of "capybara" into the full 1000-class head, ``K`` held-out classes at a time
at ``new_class_scale`` 1:

* **simulated**: the rows the rule scores (the reused fit), on the expected features, every win counted (what
  ``inject()`` recorded before the rule's ``win_share``);
* **photos**: the same rows on the photos of the held-out classes and of every kept class;
* **refit, simulated** and **refit, photos**: rows predicted by an injector refitted on the kept classes alone (a
  real new class's condition), on the same features and photos.

The held-out classes are old classes of the head, so their photos are seen-class photos: no class a user-regime
draw injects is scored as a new class here. ``refit, photos`` over ``simulated`` is the share of the simulated wins
that real new rows win on photos; their mean is the rule's ``SynthesizedCalibration.win_share``.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.photo_wins
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from benchmarks.harness.calibration import recorded_injection
from benchmarks.harness.data import MODELS, head_data
from benchmarks.harness.results import command_line, record, study_parser
from benchmarks.harness.user_regime import REGIMES
from classifier_injection.calibration import SynthesizedCalibration
from classifier_injection.calibration.reliability import expected_rates
from classifier_injection.calibration.simulation import simulate_injections, simulated_head

STUDY = "photo_wins"
#: Random hold-outs of the old classes per case (each 20 % of them, the rule's share).
REPEATS = 3
#: Rows and what they are scored on, the table's columns.
COLUMNS = ("simulated", "photos", "refit, simulated", "refit, photos")


def _pooled(tables: Sequence[dict]) -> dict[str, float]:
    """Rates of several :func:`expected_rates` tables (one count, one scale) pooled by their groups' photos."""
    recall = sum(t["recall"][0][0] for t in tables) / len(tables)
    stolen = sum(t["stolen_per_class"][0][0] for t in tables) / len(tables)
    # Precision of the pooled wins: right wins are recall x photos, wrong ones stolen x classes; equal sizes.
    right, wrong = recall, stolen * 100.0
    return {
        "recall": recall,
        "precision": 100.0 * right / (right + wrong) if right + wrong else float("nan"),
        "stolen_per_class": stolen,
    }


def measure(model_name: str, regime: str, k: int) -> dict:
    """The four columns' recall, precision (%) and stolen photos per new class for one model and regime."""
    rule = SynthesizedCalibration()
    context, choice = recorded_injection(model_name, regime, rule)
    context = simulated_head(context)
    features, labels = rule.expected_features(context)
    seen_rows, mean = context.seen_rows.detach().float(), context.feature_mean.detach().float()
    photos = head_data(model_name)
    reused = simulate_injections(context, rule.holdout_fraction, REPEATS)
    refitted = simulate_injections(dataclasses.replace(context, fitted_injector=None), rule.holdout_fraction, REPEATS)
    score = functools.partial(
        expected_rates,
        seen_rows,
        feature_mean=mean,
        factor=choice.factor,
        offset=choice.offset,
        counts=(k,),
        scales=(1.0,),
    )
    scored: dict[str, list[dict]] = {column: [] for column in COLUMNS}
    for (held, rows), (held_again, refit_rows) in zip(reused, refitted, strict=True):
        if not torch.equal(held, held_again):
            raise RuntimeError("the two simulations held out different classes")
        scored["simulated"].append(score(held, rows, features, labels))
        scored["photos"].append(score(held, rows, photos.features.float(), photos.labels))
        scored["refit, simulated"].append(score(held, refit_rows, features, labels))
        scored["refit, photos"].append(score(held, refit_rows, photos.features.float(), photos.labels))
    out = {column: _pooled(tables) for column, tables in scored.items()}
    out["factor"] = choice.factor
    out["share"] = out["refit, photos"]["recall"] / out["simulated"]["recall"]
    return out


def table(results: dict, k: int) -> str:
    """Markdown: recall / precision % and stolen per new class for each column, and the photos' share of wins."""
    lines = [
        f"### {k} held-out classes at a time, new_class_scale 1: recall / precision % (stolen per new class)",
        "",
        "| model | regime | " + " | ".join(COLUMNS) + " | refit, photos / simulated (recall) |",
        "|---|---|" + "---|" * (len(COLUMNS) + 1),
    ]
    shares = []
    for model, regimes in results.items():
        for regime, entry in regimes.items():
            cells = [
                f"{entry[c]['recall']:.1f} / {entry[c]['precision']:.1f} ({entry[c]['stolen_per_class']:.2f})"
                for c in COLUMNS
            ]
            shares.append(entry["share"])
            lines.append(f"| {model} | {regime} | " + " | ".join(cells) + f" | {entry['share']:.3f} |")
    lines += ["", f"Mean share over the {len(shares)} cases: {sum(shares) / len(shares):.3f}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.photo_wins") -> dict:
    parser = study_parser(prog, __doc__)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--k", type=int, default=10, help="held-out classes injected together")
    parser.add_argument("--name", default=STUDY, help="run name in benchmarks/results/photo_wins")
    args = parser.parse_args(argv)
    results = {m: {r: measure(m, r, args.k) for r in args.regimes} for m in args.models}
    text = table(results, args.k)
    print(text)
    record(STUDY, args.name, results, text, command_line(prog, argv), title="How many simulated wins photos give")
    return results


if __name__ == "__main__":
    main()
