"""What a new row needs for the user regime's targets: precision and recall against the row's cosine to the true row.

The draws of the user regime (:mod:`benchmarks.harness.user_regime`: ``K`` classes removed and injected back by
name through ``inject()``) are scored with rows of known quality in place of the injected ones:

* ICIS's rows, as ``inject()`` predicted them, and the same rows moved a share of the way towards the true row
  (``(1 - s) u + s t`` of their unit directions): rows of every quality between the two;
* the best blends an oracle holding the true row can make of the kept rows: a convex blend of all of them (the
  family of the mixture decoder), of the 5 nearest the true row (a blend of its siblings), and the least-squares
  linear combination;
* the true rows (the ceiling).

Every row is calibrated alike, as the default rule does (weights to the kept rows' mean norm, feature-mean bias
plus the rule's offset of 1 logit), and scored over a range of ``new_class_scale``. The true rows are used to
measure, never to choose anything.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.row_bound
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from benchmarks.harness.data import HeadData, head_data
from benchmarks.harness.results import command_line, record, study_parser
from benchmarks.harness.user_regime import (
    CURVE_SCALES,
    Draw,
    calibrated,
    curve_summary,
    curve_table,
    inject_draw,
    make_draw,
    score_rows,
)
from classifier_injection.injector import top_cosines

STUDY = "row_bound"
TITLE = "What a new row needs: the user regime against the row's cosine to the true row"
#: Shares of the way from ICIS's row towards the true row.
SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)
#: Kept rows nearest a row (by cosine) that count as its siblings.
NEAREST = 5


def best_blend(
    kept: torch.Tensor, target: torch.Tensor, among: torch.Tensor | None = None, steps: int = 1500
) -> tuple[torch.Tensor, torch.Tensor]:
    """The convex blends ``[K, D]`` of ``kept [N, D]`` with the highest cosine to each ``target [K, D]`` (over the
    rows ``among [K, m]`` only, if given), and their weights ``[K, N]``: Adam on softmax logits from uniform."""
    logits = torch.zeros(len(target), len(kept), requires_grad=True)
    mask = torch.zeros(len(target), len(kept))
    if among is not None:
        mask = torch.full_like(mask, -math.inf).scatter_(1, among, 0.0)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(steps):
        loss = -F.cosine_similarity(torch.softmax(logits + mask, 1) @ kept, target, dim=1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        weights = torch.softmax(logits + mask, 1)
        return weights @ kept, weights


def best_linear(kept: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The least-squares combinations ``[K, D]`` of ``kept [N, D]`` nearest each ``target [K, D]``."""
    solution = torch.linalg.lstsq(kept.double().T, target.double().T).solution
    return (kept.double().T @ solution).T.float()


def draw_directions(
    draw: Draw, data: HeadData, regimes: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The weight directions ``[K, D]`` of every row family for one draw of ``data``'s head, how many of the true
    row's 5 nearest kept rows ICIS's row shares, and the best blend's effective rows."""
    weights = data.rows[:, :-1].float()
    kept, true = weights[draw.kept], weights[torch.as_tensor(draw.removed)]
    out = {"true rows": true}
    nearest = top_cosines(kept, true, NEAREST)[1]
    extra: dict[str, float] = {}
    for regime in regimes:
        icis = inject_draw(draw, regime)[0][:, :-1].float()
        out[f"{regime}: ICIS"] = icis
        for share in SHARES:
            out[f"{regime}: ICIS, {share:g} of the way to the true row"] = (
                F.normalize(icis, dim=1) * (1 - share) + F.normalize(true, dim=1) * share
            )
        near_icis = top_cosines(kept, icis, NEAREST)[1]
        out[f"{regime}: the best blend of the 5 kept rows nearest ICIS's row"], _ = best_blend(kept, true, near_icis)
        shared = (nearest[:, :, None] == near_icis[:, None, :]).any(2).sum(1)
        extra[f"{regime}: shared nearest rows"] = shared.float().mean().item()
    out["best blend of all kept rows"], blend = best_blend(kept, true)
    out["best blend of the 5 kept rows nearest the true row"], _ = best_blend(kept, true, nearest)
    out["best linear combination of the kept rows"] = best_linear(kept, true)
    return out, {**extra, "best blend's effective rows": (1 / blend.square().sum(1)).mean().item()}


def measure(model: str, k: int, draws: Sequence[int], regimes: Sequence[str]) -> dict:
    """Every family's :func:`curve_summary` over the draws, and the best blends' mean effective rows."""
    data = head_data(model)
    counts: dict[str, list[dict]] = {}
    cosines: dict[str, list[float]] = {}
    extras: dict[str, list[float]] = {}
    for number in draws:
        draw = make_draw(model, k, number)
        directions, extra = draw_directions(draw, data, regimes)
        true = directions["true rows"]
        old_rows = data.rows[draw.kept]
        for name, direction in directions.items():
            rows = calibrated(direction, old_rows, data.feature_mean)
            counts.setdefault(name, []).append(score_rows(draw, rows, CURVE_SCALES))
            cosines.setdefault(name, []).extend(F.cosine_similarity(direction, true, dim=1).tolist())
        for name, value in extra.items():
            extras.setdefault(name, []).append(value)
        print(f"{model} K = {k} draw {number} done", flush=True)
    summary = {name: curve_summary(counts[name], cosines[name]) for name in counts}
    return {"families": summary, **{name: sum(v) / len(v) for name, v in extras.items()}}


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.row_bound") -> dict:
    parser = study_parser(prog, __doc__)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--k", type=int, default=10, help="classes removed and injected back per draw")
    parser.add_argument("--draws", type=int, default=8, help="draws 0..N-1 of the user regime")
    parser.add_argument("--regimes", nargs="+", default=["wordnet", "name-only"])
    parser.add_argument("--name", default=STUDY, help="run name in benchmarks/results/row_bound")
    args = parser.parse_args(argv)
    draws = list(range(args.draws))
    result = measure(args.model, args.k, draws, args.regimes)
    heading = (
        f"{args.model}, K = {args.k}, draws {draws[0]}-{draws[-1]}: rows of known quality in place of the injected ones"
    )
    text = curve_table(heading, args.regimes, result)
    print(text)
    record(STUDY, args.name, result, text, command_line(prog, argv), title=TITLE)
    return result


if __name__ == "__main__":
    main()
