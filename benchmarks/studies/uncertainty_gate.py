"""Does a new class's photo look unfamiliar to the old head? New logits raised by the old head's uncertainty.

A new row blended from its neighbours' rows scores their photos as high as they do, so it takes them. The old head
knows something the new row does not: it wins a photo of one of its own classes with confidence, and spreads a photo
of a class it lacks over the classes that photo resembles. This study raises every new class's logit on a photo by
``lam`` times the entropy (in nats) of the old head's softmax on that photo, the old logits unchanged, and scores
the precision-recall curve over ``new_class_scale`` (0.1-2.5, lower than the other studies' range, as the gate
does part of the rows' work). ``lam`` 0 is the rows as they are.

The injections: the user regime's draws (``K`` classes removed and injected back by name, the rows as ``inject()``
makes them) or, with ``--held-out``, held-out old classes (the default rule's simulation, its rows refitted as a
new class's are and calibrated as the default rule calibrates them), on which a setting could be chosen, or, with
``--protocol``, the 200-of-1000 protocol's folds (the library's default rows; S / U / H). The old
head's entropy also says how well it tells the photos of the new classes from the others on its own (AUROC).
The benchmark's photos are probably the models' training images, which a head wins with more confidence than
photos it never saw; ``--image-size`` scores the same rows on the photos resized (harder photos).
The photos measure; the study chooses nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.uncertainty_gate
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from benchmarks.harness.calibration import held_out_injections
from benchmarks.harness.data import HeadData, fold_classes, head_data
from benchmarks.harness.descriptors import fold_descriptors
from benchmarks.harness.metrics import evaluate_rows, seen_mask
from benchmarks.harness.results import command_line, record, study_parser
from benchmarks.harness.user_regime import (
    calibrated,
    curve_rates,
    curve_summary,
    curve_table,
    grown_labels,
    inject_draw,
    make_draw,
    score_head,
)
from classifier_injection import ICISInjector
from classifier_injection.core import predict_rows

STUDY = "uncertainty_gate"
TITLE = "New logits raised by the old head's uncertainty on the photo"
#: Logits added per nat of the old head's entropy.
LAMBDAS = (0.25, 0.5, 0.75, 1.0)
#: ``new_class_scale`` values of the curves.
GATE_SCALES = tuple(round(0.1 + 0.05 * i, 2) for i in range(49))
#: The name of the rows without a gate.
UNGATED = "ICIS, no gate"

Injection = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy (nats) of each row's softmax."""
    log_p = logits.log_softmax(1)
    return -(log_p.exp() * log_p).sum(1)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    above = (pos[:, None] > neg[None, :]).float() + 0.5 * (pos[:, None] == neg[None, :]).float()
    return above.mean().item()


def gate_curves(photos: HeadData, injections: Iterable[Injection], lambdas: Sequence[float] = LAMBDAS) -> dict:
    """Every gate's :func:`~benchmarks.harness.user_regime.curve_summary` and rates at each scale over ``injections``
    of ``(old rows, new rows, the new classes)``, and the AUROC of the old head's entropy for the new classes'
    photos, pooled."""
    counts: dict[str, list[dict]] = {}
    cosines: list[float] = []
    uncertainty, is_new = [], []
    for old_rows, new_rows, new_classes in injections:
        true = photos.rows[new_classes, :-1].float()
        cosines += F.cosine_similarity(new_rows[:, :-1].float(), true, dim=1).tolist()
        target = grown_labels(len(photos.rows), new_classes)[photos.labels]
        gate = entropy(photos.logits(old_rows))
        uncertainty.append(gate)
        is_new.append(target >= len(old_rows))
        for lam in (0.0, *lambdas):
            name = UNGATED if lam == 0 else f"entropy gate, lam {lam:g}"
            offsets = None if lam == 0 else lam * gate
            scored, _ = score_head(photos, old_rows, new_rows, target, GATE_SCALES, offsets)
            counts.setdefault(name, []).append(scored)
    return {
        "families": {name: curve_summary(per, cosines, GATE_SCALES) for name, per in counts.items()},
        "curves": {
            name: {str(scale): rates for scale, rates in curve_rates(per, GATE_SCALES).items()}
            for name, per in counts.items()
        },
        "entropy auroc": auroc(torch.cat(uncertainty), torch.cat(is_new)),
    }


@torch.no_grad()
def gated_gzsl(
    photos: HeadData, held: torch.Tensor, new_rows: torch.Tensor, lambdas: Sequence[float], scales: Sequence[float]
) -> dict[float, dict[float, dict]]:
    """S, U and H (%) of the protocol's head (the seen rows, ``new_rows`` for the ``held`` classes, times a scale),
    every new logit raised by ``lam`` x the seen rows' entropy on the photo: ``{lam: {scale: rates}}``."""
    seen = seen_mask(len(photos.rows), held)
    old = photos.logits(photos.rows[seen])
    gate = entropy(old)[:, None]
    grown = torch.empty(len(photos.rows), dtype=torch.long)
    grown[seen] = torch.arange(int(seen.sum()))
    grown[held] = int(seen.sum()) + torch.arange(len(held))
    target, photo_seen = grown[photos.labels], seen[photos.labels]
    out: dict[float, dict[float, dict]] = {lam: {} for lam in lambdas}
    for scale in scales:
        new = photos.logits(new_rows.to(photos.rows.dtype) * scale)
        for lam in lambdas:
            correct = torch.cat([old, new + lam * gate], 1).argmax(1) == target
            s, u = (100 * correct[mask].float().mean().item() for mask in (photo_seen, ~photo_seen))
            out[lam][scale] = {"seen": s, "unseen": u, "h": 2 * s * u / (s + u) if s + u else 0.0}
    return out


def protocol_curves(photos: HeadData, folds: Sequence[int], lambdas: Sequence[float] = LAMBDAS) -> dict:
    """The 200-of-1000 protocol with the library's default rows (ICIS, default descriptors and calibration): ZSL
    (which a gate cannot change: it raises every new class alike) and the 5-fold mean S / U / H of each gate at
    scale 1 and at its best scale."""
    per_fold: dict[str, dict[str, list[dict]]] = {}
    zsl = []
    for fold in folds:
        held = torch.as_tensor(fold_classes(fold))
        descriptors = fold_descriptors("minilm-default", held.numpy())
        seen = seen_mask(len(photos.rows), held)
        rows = predict_rows(
            photos.rows[seen], descriptors[seen], descriptors[held], ICISInjector(seed=0), features=photos.statistics()
        ).rows
        zsl.append(evaluate_rows(photos, held.numpy(), rows)["zsl"])
        for lam, by_scale in gated_gzsl(photos, held, rows, (0.0, *lambdas), GATE_SCALES).items():
            name = UNGATED if lam == 0 else f"entropy gate, lam {lam:g}"
            for scale, rates in by_scale.items():
                per_fold.setdefault(name, {}).setdefault(str(scale), []).append(rates)
        print(f"{photos.model_name} fold {fold} done", flush=True)
    out: dict = {"zsl": sum(zsl) / len(zsl), "families": {}}
    for name, by_scale in per_fold.items():
        means = {
            scale: {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]} for scale, runs in by_scale.items()
        }
        best = max(means, key=lambda scale: means[scale]["h"])
        out["families"][name] = {"at_1": means["1.0"], "best_scale": float(best), "at_best": means[best]}
    return out


def protocol_table(heading: str, result: dict) -> str:
    """Markdown of :func:`protocol_curves`."""
    lines = [
        f"##### {heading}",
        "",
        f"ZSL {result['zsl']:.1f} (every gate). S / U / H in %, means over the folds.",
        "",
        "| new logits | at scale 1 | best H (scale) |",
        "|---|---|---|",
    ]
    for name, entry in result["families"].items():
        at_1, best = entry["at_1"], entry["at_best"]
        lines.append(
            f"| {name} | {at_1['seen']:.1f} / {at_1['unseen']:.1f} / {at_1['h']:.1f} | "
            f"{best['seen']:.1f} / {best['unseen']:.1f} / {best['h']:.1f} ({entry['best_scale']:g}) |"
        )
    return "\n".join(lines)


def user_injections(photos: HeadData, k: int, draws: Sequence[int], regime: str) -> Iterator[Injection]:
    """The user regime's draws, their new rows as ``inject()`` makes them."""
    for number in draws:
        draw = make_draw(photos.model_name, k, number)
        rows, _ = inject_draw(draw, regime)
        yield photos.rows[draw.kept], rows, torch.as_tensor(draw.removed)
        print(f"{photos.model_name} K = {k} {regime} draw {number} done", flush=True)


def held_out(photos: HeadData, k: int, regime: str) -> Iterator[Injection]:
    """Held-out old classes ``k`` at a time, their rows calibrated as the default rule calibrates them."""
    for old_rows, predicted, classes, factor in held_out_injections(photos.model_name, k, regime):
        width = old_rows.shape[1] - 1
        yield old_rows, calibrated(predicted[:, :width], old_rows, photos.feature_mean, factor), classes


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.uncertainty_gate") -> dict:
    parser = study_parser(prog, __doc__)
    parser.add_argument("--models", nargs="+", default=["tf_efficientnet_lite0"])
    parser.add_argument("--k", type=int, default=10, help="new classes per injection")
    parser.add_argument("--draws", type=int, default=8, help="draws 0..N-1 of the user regime")
    parser.add_argument("--held-out", action="store_true", help="held-out old classes instead of the user regime")
    parser.add_argument("--protocol", action="store_true", help="the 200-of-1000 protocol's 5 folds instead")
    parser.add_argument("--lambdas", nargs="+", type=float, default=list(LAMBDAS), help="logits per nat of entropy")
    parser.add_argument("--regimes", nargs="+", default=["wordnet", "name-only"])
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="photos resized to this many pixels (harder photos; rows as before)",
    )
    parser.add_argument("--name", default=STUDY, help=f"run name in benchmarks/results/{STUDY}")
    args = parser.parse_args(argv)
    draws = list(range(args.draws))
    result: dict = {}
    sections = []
    size = "" if args.image_size is None else f", photos at {args.image_size} px"
    for model in args.models:
        photos = head_data(model, image_size=args.image_size)
        if args.protocol:
            heading = f"{model}, the 200-of-1000 protocol, 5 folds{size}"
            result[heading] = protocol_curves(photos, range(5), args.lambdas)
            sections.append(protocol_table(heading, result[heading]))
            continue
        for regime in args.regimes:
            if args.held_out:
                injections = held_out(photos, args.k, regime)
                heading = f"{model}, {regime}, held-out old classes, {args.k} at a time{size}"
            else:
                injections = user_injections(photos, args.k, draws, regime)
                heading = f"{model}, {regime}, K = {args.k}, draws {draws[0]}-{draws[-1]}{size}"
            entry = gate_curves(photos, injections, args.lambdas)
            result[heading] = entry
            table = curve_table(heading, [], entry, GATE_SCALES)
            sections.append(
                f"{table}\n\nAUROC of the old head's entropy for the new classes' photos: {entry['entropy auroc']:.3f}"
            )
    text = "\n\n".join(sections)
    print(text)
    record(STUDY, args.name, result, text, command_line(prog, argv), title=TITLE)
    return result


if __name__ == "__main__":
    main()
