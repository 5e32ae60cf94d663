"""Per-row calibration from what a new row itself shows: does any image-free signal tell which rows take photos?

The false wins of the user regime's new rows are concentrated: the fifth of the rows that take most take about
two thirds of the old photos taken. This study asks whether a signal of the row alone, known before any photo,
picks those rows out, and whether a per-row norm or bias built on it lifts the precision-recall curve. ICIS's
rows of each draw (lite0, ``K`` new classes, as ``inject()`` predicts them) are calibrated as the default rule
calibrates them (the kept rows' mean norm times the rule's factor, the feature-mean bias plus 1 logit) and then
changed per row:

* **blend norm**: the norm of the mixture's convex blend before calibration (a flat blend of unlike rows is
  short, a blend of a few like rows long); each row's norm is multiplied by ``(norm / mean norm) ** gamma``;
* **neighbour similarity**: the mean cosine of the row to its 5 nearest kept rows, as a z-score against the
  kept rows' own; the bias is lowered by ``lam`` times it (a CSLS-like correction of hubs), or by ``lam`` times
  its difference from the injection's mean z-score (the new rows' level kept, only their order changed);
* **logit spread**: the row scaled to the kept rows' mean ``sqrt(sum_c w_c^2 s_c^2)``, the spread of its logit
  under the model's feature statistics, instead of their mean norm.

Every family is scored over a range of ``new_class_scale``, as the study ``row_bound`` scores rows.
The photos measure; the study chooses nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.row_signals
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks.harness.calibration import held_out_injections
from benchmarks.harness.data import head_data
from benchmarks.harness.results import command_line, record, study_parser
from benchmarks.harness.user_regime import (
    CURVE_SCALES,
    RULE_OFFSET,
    curve_summary,
    curve_table,
    grown_labels,
    inject_draw,
    make_draw,
    score_head,
)
from classifier_injection import ICISInjector
from classifier_injection.calibration.base import feature_mean_biases, mean_norm
from classifier_injection.injector import top_cosines

STUDY = "row_signals"
TITLE = "Per-row calibration from the row alone: blend norm, neighbour similarity, logit spread"
#: Exponents of the blend norm's factor.
GAMMAS = (-0.5, -0.25, 0.5)
#: Bias shifts (logits) per unit of the neighbour-similarity z-score.
LAMBDAS = (0.25, 0.5, 1.0)
#: Kept rows that count as a row's neighbours.
NEIGHBOURS = 5
#: Share of the rows, sorted by false wins, whose share of all false wins is reported.
TOP_SHARE = 0.2


class _KeepsPredictions(ICISInjector):
    """ICIS that keeps the rows of its last prediction, before any calibration."""

    predicted: torch.Tensor | None = None

    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        self.predicted = super().predict(descriptors)
        return self.predicted


def neighbour_similarity(new: torch.Tensor, old: torch.Tensor, neighbours: int = NEIGHBOURS) -> torch.Tensor:
    """Each new row's mean cosine to its ``neighbours`` nearest ``old`` rows, as a z-score against the old rows' own
    (each old row's mean cosine to its nearest other old rows)."""
    near = top_cosines(old, new, neighbours)[0].mean(1)
    unit = F.normalize(old, dim=1)
    among = unit @ unit.T
    among.fill_diagonal_(-2.0)
    own = among.topk(neighbours, dim=1).values.mean(1)
    return (near - own.mean()) / own.std()


def logit_spread(rows: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum_c w_c^2 s_c^2)`` of each unit row: its logit's spread were the features independent."""
    return (F.normalize(rows, dim=1).square() * spread.square()).sum(1).sqrt()


def families(
    blend: torch.Tensor, old_rows: torch.Tensor, feature_mean: torch.Tensor, spread: torch.Tensor, factor: float = 1.0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every family's rows ``[K, D + 1]`` for the blends ``[K, D(+1)]`` of one injection into ``old_rows``, and the
    signals they are built on. ``factor``: the default rule's norm factor."""
    blend = blend[:, : old_rows.shape[1] - 1].float()
    kept = old_rows[:, :-1].float()
    base = F.normalize(blend, dim=1) * mean_norm(old_rows) * factor

    def rows(weights: torch.Tensor, shift: torch.Tensor | float = 0.0) -> torch.Tensor:
        biases = feature_mean_biases(weights, old_rows, feature_mean) + RULE_OFFSET - shift
        return torch.cat([weights, biases[:, None].to(weights.dtype)], 1)

    norm = blend.norm(dim=1)
    similarity = neighbour_similarity(blend, kept)
    spreads = logit_spread(blend, spread)
    out = {"ICIS, the default's calibration": rows(base)}
    for gamma in GAMMAS:
        out[f"blend norm, gamma {gamma:g}"] = rows(base * ((norm / norm.mean()) ** gamma)[:, None])
    for lam in LAMBDAS:
        out[f"neighbour similarity, lam {lam:g}"] = rows(base, lam * similarity)
        out[f"neighbour similarity about the injection's mean, lam {lam:g}"] = rows(
            base, lam * (similarity - similarity.mean())
        )
    out["logit spread"] = rows(base * (logit_spread(kept, spread).mean() / spreads)[:, None])
    return out, {"blend norm": norm, "neighbour similarity": similarity, "logit spread": spreads}


def user_injections(model: str, k: int, draws: Sequence[int], regime: str):
    """The user regime's draws: ``(old rows, blends, new classes, the rule's factor)`` per injection of ICIS's rows,
    as ``inject()`` makes them."""
    data = head_data(model)
    for number in draws:
        draw = make_draw(model, k, number)
        injector = _KeepsPredictions(seed=0)
        _, record = inject_draw(draw, regime, injector=injector)
        yield data.rows[draw.kept], injector.predicted, torch.as_tensor(draw.removed), record["calibration"]["factor"]
        print(f"{model} K = {k} {regime} draw {number} done", flush=True)


def measure(model: str, regimes: Sequence[str], injections) -> dict:
    """Every family's :func:`~benchmarks.harness.user_regime.curve_summary` over ``injections(regime)``, the share
    of false wins the most stealing rows take, and each signal's correlation with a row's false wins."""
    photos = head_data(model)
    spread = photos.feature_std.float()
    out: dict = {"families": {}}
    for regime in regimes:
        counts: dict[str, list[dict]] = {}
        signals: dict[str, list[float]] = {}
        false_wins: list[int] = []
        cosines: list[float] = []
        for old_rows, blend, new_classes, factor in injections(regime):
            rows, values = families(blend, old_rows, photos.feature_mean, spread, factor)
            true = photos.rows[new_classes, :-1].float()
            cosines += F.cosine_similarity(rows["ICIS, the default's calibration"][:, :-1], true, dim=1).tolist()
            target = grown_labels(len(photos.rows), new_classes)[photos.labels]
            for name, new_rows in rows.items():
                scored, per_class = score_head(photos, old_rows, new_rows, target, CURVE_SCALES)
                counts.setdefault(name, []).append(scored)
                if name == "ICIS, the default's calibration":
                    false_wins += [c["wins"] - c["hit"] for c in per_class]
            for name, value in values.items():
                signals.setdefault(name, []).extend(value.tolist())
        for name, per_injection in counts.items():
            out["families"][f"{regime}: {name}"] = curve_summary(per_injection, cosines)
        ordered = torch.tensor(false_wins, dtype=torch.float).sort(descending=True).values
        top = max(1, round(TOP_SHARE * len(ordered)))
        out[f"{regime}: false wins of the top {TOP_SHARE:.0%} of rows"] = (ordered[:top].sum() / ordered.sum()).item()
        for name, values in signals.items():
            pair = torch.tensor([values, false_wins], dtype=torch.float)
            out[f"{regime}: {name}: correlation with false wins"] = torch.corrcoef(pair)[0, 1].item()
    return out


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.row_signals") -> dict:
    parser = study_parser(prog, __doc__)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--k", type=int, default=10, help="new classes per injection")
    parser.add_argument("--draws", type=int, default=8, help="draws 0..N-1 of the user regime")
    parser.add_argument("--held-out", action="store_true", help="held-out old classes instead of the user regime")
    parser.add_argument("--regimes", nargs="+", default=["wordnet", "name-only"])
    parser.add_argument("--name", default=STUDY, help="run name in benchmarks/results/row_signals")
    args = parser.parse_args(argv)
    draws = list(range(args.draws))
    if args.held_out:
        result = measure(args.model, args.regimes, lambda regime: held_out_injections(args.model, args.k, regime))
        heading = f"{args.model}, held-out old classes, {args.k} at a time: per-row calibrations of ICIS's rows"
    else:
        result = measure(args.model, args.regimes, lambda regime: user_injections(args.model, args.k, draws, regime))
        heading = f"{args.model}, K = {args.k}, draws {draws[0]}-{draws[-1]}: per-row calibrations of ICIS's rows"
    notes = [f"- {name}: {value:.2f}" for name, value in result.items() if name != "families"]
    text = "\n".join([curve_table(heading, [], result), "", *notes])
    print(text)
    record(STUDY, args.name, result, text, command_line(prog, argv), title=TITLE)
    return result


if __name__ == "__main__":
    main()
