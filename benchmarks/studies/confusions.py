"""Are a new class's nearest old classes the ones it is confused with? The reliability record, against the photos.

``inject()`` records for each new class its three nearest old classes by row cosine
(:func:`~classifier_injection.calibration.reliability.assess`), and ``info`` prints them as the classes it will be
confused with. This study checks that on the user regime (:mod:`benchmarks.harness.user_regime`: ``K`` classes
removed from the head and injected back by name, library defaults, one photo per class, scale 1):

* **taken**: old photos a new class won; the share whose class is among that new class's 3 nearest old classes
  (and its nearest alone);
* **lost**: a new class's own photo won by an old class; the share won by one of its 3 nearest old classes.

Chance is 3 / (1000 - K) for the 3 nearest.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.confusions
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from benchmarks.harness.data import MODELS, head_data
from benchmarks.harness.results import command_line, record, study_parser
from benchmarks.harness.user_regime import add_draw_arguments, inject_draw, make_draw, run_cases
from classifier_injection.calibration.reliability import nearest_cosines

STUDY = "confusions"
#: Draws of the user regime per model and regime (its plan's number for K = 10).
DRAWS = 8
#: The nearest old classes the record keeps.
NEAREST = 3


@torch.no_grad()
def draw_confusions(model_name: str, k: int, draw: int, regime: str) -> dict[str, int]:
    """One draw's counts: photos taken and lost, and how many of each involve the new class's nearest old classes."""
    spec = make_draw(model_name, k, draw)
    rows, _ = inject_draw(spec, regime)
    data = head_data(model_name)
    old_rows = data.rows[spec.kept]
    num_old = len(old_rows)
    nearest = nearest_cosines(rows, old_rows, NEAREST)[1]  # [K, 3]: old classes, as indices of the grown head
    winner = torch.cat([data.logits(old_rows), data.logits(rows.to(data.rows.dtype))], dim=1).argmax(1)
    target = spec.grown_labels()[data.labels]  # each photo's class in the grown head: new class j is num_old + j
    counts = dict.fromkeys(("taken", "taken_nearest", "taken_first", "lost", "lost_nearest"), 0)
    for j in range(spec.k):
        taken = target[(winner == num_old + j) & (target < num_old)]
        counts["taken"] += len(taken)
        counts["taken_nearest"] += int(torch.isin(taken, nearest[j]).sum())
        counts["taken_first"] += int((taken == nearest[j, 0]).sum())
        lost_to = winner[(target == num_old + j) & (winner < num_old)]
        counts["lost"] += len(lost_to)
        counts["lost_nearest"] += int(torch.isin(lost_to, nearest[j]).sum())
    return counts


def rates(counts: Sequence[dict[str, int]], k: int) -> dict[str, float]:
    """Shares (%) pooled over draws, and chance for the 3 nearest."""
    total = {key: sum(c[key] for c in counts) for key in counts[0]}

    def share(part: str, whole: str) -> float:
        return 100 * total[part] / total[whole] if total[whole] else float("nan")

    return {
        **total,
        "taken_nearest_pct": share("taken_nearest", "taken"),
        "taken_first_pct": share("taken_first", "taken"),
        "lost_nearest_pct": share("lost_nearest", "lost"),
        "chance_pct": 100 * NEAREST / (1000 - k),
    }


def table(results: dict) -> str:
    lines = [
        f"### Photos taken and lost by new classes, and the share that involves their {NEAREST} nearest old classes",
        "",
        "| model, K | regime | old photos taken | of them by the 3 nearest | by the nearest | own photos lost | "
        "of them to the 3 nearest | chance (3 nearest) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case, regimes in results.items():
        for regime, r in regimes.items():
            lines.append(
                f"| {case} | {regime} | {r['taken']} | {r['taken_nearest_pct']:.1f} % | {r['taken_first_pct']:.1f} % | "
                f"{r['lost']} | {r['lost_nearest_pct']:.1f} % | {r['chance_pct']:.2f} % |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.confusions") -> dict:
    parser = study_parser(prog, __doc__)
    add_draw_arguments(parser, MODELS, DRAWS, STUDY)
    args = parser.parse_args(argv)

    def measure(model_name: str, regime: str) -> dict:
        return rates([draw_confusions(model_name, args.k, d, regime) for d in range(args.draws)], args.k)

    results = run_cases(args, measure)
    text = table(results)
    print(text)
    record(STUDY, args.name, results, text, command_line(prog, argv), title="Nearest old classes against confusions")
    return results


if __name__ == "__main__":
    main()
