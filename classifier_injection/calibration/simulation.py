"""The simulation behind the image-free rules: inject some of the head's own classes and score the result.

A simulated injection holds out old classes and predicts their rows as new classes' rows: with the injection's own
fit, their rows left out of every blend, or else with a fresh injector refitted on the others
(:func:`simulate_injections`). Curves score every candidate norm factor on proxy features: the rows' own
directions (:func:`prototype_gzsl_curve`) or features synthesised from the model's statistics
(:func:`synthesize_features`, :func:`synthetic_gzsl_curve`). Results are kept in the context, so rules fitted on
one context share them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .base import CalibrationContext, mean_norm

__all__ = [
    "DEFAULT_FACTORS",
    "MAX_SIMULATED_CLASSES",
    "gzsl_accuracies",
    "held_mask",
    "largest_keeping",
    "largest_within_budget",
    "new_row_responses",
    "prototype_gzsl_curve",
    "prototype_scores",
    "simulate_injections",
    "simulated_features",
    "simulated_head",
    "simulation_diagnostics",
    "synthesize_features",
    "synthetic_gzsl_curve",
    "synthetic_scores",
]

#: Candidate norm factors, 0.5 ... 6.0 in steps of 0.025 (fine enough not to overshoot the smallest good one).
DEFAULT_FACTORS: tuple[float, ...] = tuple(round(0.5 + 0.025 * i, 3) for i in range(221))
#: Larger heads are simulated on a random subset of this many classes: a simulation costs the square of its
#: classes, and the subset keeps the held-out share, and so the competition per class, of the whole head.
MAX_SIMULATED_CLASSES = 1024


def simulated_head(context: CalibrationContext) -> CalibrationContext:
    """The context the simulation runs on: ``context`` itself, or a seeded subset of its classes for large heads."""
    num = len(context.seen_rows)
    if num <= MAX_SIMULATED_CLASSES:
        return context

    def subset() -> CalibrationContext:
        generator = torch.Generator().manual_seed(context.seed)
        keep = torch.randperm(num, generator=generator)[:MAX_SIMULATED_CLASSES].sort().values
        descriptors, index = context.seen_descriptors, context.seen_index
        return dataclasses.replace(
            context,
            seen_rows=context.seen_rows[keep],
            seen_descriptors=descriptors[keep] if descriptors is not None else None,
            seen_index=keep if index is None else index[keep],
        )

    return context.memoized(("subset", MAX_SIMULATED_CLASSES), subset)


def held_mask(num: int, held_out: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[num]``: True for the ``held_out`` classes."""
    held = torch.zeros(num, dtype=torch.bool)
    held[held_out] = True
    return held


def gzsl_accuracies(
    wins: torch.Tensor,
    arg_old: torch.Tensor,
    arg_new: torch.Tensor,
    labels: torch.Tensor,
    held_out: torch.Tensor,
    num: int,
) -> torch.Tensor:
    """S, U, H (%) per factor ``[F, 3]`` from ``wins [F, M]`` (a new row out-scores the kept ones on sample ``m``)."""
    held = held_mask(num, held_out)
    own_kept = torch.full((num,), -1, dtype=torch.long)
    own_kept[~held] = torch.arange(int((~held).sum()))
    own_new = torch.full((num,), -1, dtype=torch.long)
    own_new[held_out] = torch.arange(len(held_out))
    is_new = held[labels]
    # Accuracies in float64 before the harmonic mean, returned as float32 (as the rules have always read them).
    s = 100 * ((~wins) & (arg_old == own_kept[labels]))[:, ~is_new].float().mean(1).double()
    u = 100 * (wins & (arg_new == own_new[labels]))[:, is_new].float().mean(1).double()
    h = torch.where(s + u > 0, 2 * s * u / (s + u).clamp_min(1e-12), torch.zeros_like(s))
    return torch.stack([s, u, h], dim=1).float()


def prototype_gzsl_curve(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    factors: Sequence[float],
) -> torch.Tensor:
    """Simulated GZSL accuracies ``[len(factors), 3]`` (S, U, H in %) of an injection of held-out classes.

    The ``held_out`` rows are replaced by ``predicted_rows`` (normalised to factor x the kept rows' mean norm).
    Each class is represented by the direction of its true row (under neural collapse, class means align with
    the rows); proxies have no absolute scale, so logits are compared without biases. S: kept-class proxies
    still won by their own row; U: held-out proxies won by their predicted row.
    """
    num = seen_rows.shape[0]
    old, new = prototype_scores(seen_rows, held_out, predicted_rows)
    best_old, arg_old = old.max(dim=1)
    best_new, arg_new = new.max(dim=1)
    wins = torch.tensor(list(factors), dtype=torch.float32)[:, None] * best_new[None] > best_old[None]
    return gzsl_accuracies(wins, arg_old, arg_new, torch.arange(num), held_out, num)


def prototype_scores(
    seen_rows: torch.Tensor, held_out: torch.Tensor, predicted_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores on every class's proxy (its row's direction): of the kept rows ``[N, N - H]``, and of the predicted
    rows at factor 1 ``[N, H]`` (normalised to the kept rows' mean norm); no biases."""
    kept_w = seen_rows[~held_mask(len(seen_rows), held_out), :-1].float()
    proxies = F.normalize(seen_rows[:, :-1].float(), dim=1)
    new_w = F.normalize(predicted_rows[:, :-1].float(), dim=1) * kept_w.norm(dim=1).mean()
    return proxies @ kept_w.T, proxies @ new_w.T


def synthesize_features(
    seen_rows: torch.Tensor,
    feature_mean: torch.Tensor,
    feature_spread: torch.Tensor,
    confidence: float,
    samples: int = 4,
    seed: int = 0,
    max_steps: int = 2000,
    neighbour_share: float = 0.0,
    neighbours: int = 5,
    step_size: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[N * samples, D]`` and labels ``[N * samples]`` synthesised for every class of the head.

    Each starts at ``feature_mean + feature_spread * z`` (``z ~ N(0, I)``: a feature of no class in particular)
    and climbs the head's cross-entropy to a target by normalised gradient steps (``t @ W - p @ W``) of ``step_size``
    x the expected norm of the start's spread, until the head gives its class probability ``confidence``. The target
    ``t`` is its class alone (``neighbour_share = 0``: the feature moves away from the classes the head confuses it
    with, as trained features do), or gives ``neighbour_share`` in equal parts to the ``neighbours`` rows nearest
    to its class's row (cosine): a feature that keeps what its class shares with its neighbours, as photos do.

    The climb runs on the logits through the rows' Gram matrix (``N x N`` per step and feature, not
    ``2 x N x D``); each feature's path is kept as coefficients on the rows and applied once at the end.
    """
    weights, biases = seen_rows[:, :-1].float(), seen_rows[:, -1].float()
    num, dim = weights.shape
    mean, spread = feature_mean.float().reshape(-1), feature_spread.float().reshape(-1)
    if mean.shape != (dim,) or spread.shape != (dim,):
        raise ValueError(
            f"feature_mean and feature_spread must be [{dim}], got {tuple(mean.shape)}, {tuple(spread.shape)}"
        )
    if not 0 <= neighbour_share < 1:
        raise ValueError(f"neighbour_share must be in [0, 1), got {neighbour_share}")
    labels = torch.arange(num).repeat_interleave(samples)
    generator = torch.Generator().manual_seed(seed)
    features = mean + spread * torch.randn(len(labels), dim, generator=generator)
    step = float(spread.norm()) * step_size
    gram = weights @ weights.T
    nearest = _nearest_rows(weights, min(neighbours, num - 1)) if neighbour_share > 0 else None
    # A feature's climb depends on itself alone: in chunks, its temporaries stay [chunk, N].
    for start in range(0, len(labels), _CLIMB_CHUNK):
        part = slice(start, start + _CLIMB_CHUNK)
        targets = _targets(labels[part], num, nearest, neighbour_share)
        _climb(features[part], labels[part], targets, weights, biases, gram, step, confidence, max_steps)
    return features, labels


#: Features climbed at a time.
_CLIMB_CHUNK = 1024


def _nearest_rows(weights: torch.Tensor, count: int) -> torch.Tensor:
    """``[N, count]``: for each row, the other rows nearest to it by cosine."""
    unit = F.normalize(weights, dim=1)
    cosines = unit @ unit.T
    cosines.fill_diagonal_(-math.inf)
    return cosines.topk(count, dim=1).indices


def _targets(labels: torch.Tensor, num: int, nearest: torch.Tensor | None, share: float) -> torch.Tensor:
    """``[M, N]`` climb targets: ``1 - share`` on each feature's class and ``share`` spread over its nearest rows."""
    targets = torch.zeros(len(labels), num)
    targets[torch.arange(len(labels)), labels] = 1 - share
    if nearest is not None and nearest.shape[1] > 0:
        targets.scatter_(1, nearest[labels], share / nearest.shape[1])
    return targets


def _climb(
    features: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    biases: torch.Tensor,
    gram: torch.Tensor,
    step: float,
    confidence: float,
    max_steps: int,
) -> None:
    """Move ``features`` (in place) up their cross-entropy to ``targets``, as :func:`synthesize_features` says."""
    # A feature's path so far is step * path[m] @ weights. The climbing features' logits, targets and paths are
    # kept packed; a feature that arrives leaves them for good.
    logits = features @ weights.T + biases
    coefficients = torch.zeros(len(labels), len(weights))
    index, own, path = torch.arange(len(labels)), labels.clone(), coefficients.clone()
    for _ in range(max_steps):
        probs = torch.softmax(logits, dim=1)
        climbing = probs[torch.arange(len(own)), own] < confidence
        if not climbing.all():
            done = ~climbing  # their paths are final
            coefficients[index[done]] = path[done]
            if not climbing.any():
                break
            index, own, targets = index[climbing], own[climbing], targets[climbing]
            logits, path, probs = logits[climbing], path[climbing], probs[climbing]
        # The direction (t - p) @ W, seen through the head: its logits and its squared norm.
        direction = targets - probs
        direction_logits = direction @ gram
        inverse = (direction_logits * direction).sum(1).clamp_min(1e-24).rsqrt()
        logits += direction_logits.mul_(step * inverse[:, None])
        path += direction.mul_(inverse[:, None])
    else:
        coefficients[index] = path
    features += (coefficients @ weights).mul_(step)


def synthetic_gzsl_curve(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    factors: Sequence[float],
    features: torch.Tensor,
    labels: torch.Tensor,
    feature_mean: torch.Tensor,
    offset: float = 0.0,
) -> torch.Tensor:
    """Simulated GZSL accuracies ``[len(factors), 3]`` (S, U, H in %) on synthesised features, biases included.

    As :func:`prototype_gzsl_curve`, but on features with a real scale (:func:`synthesize_features`): kept rows
    keep their biases, predicted rows get ``factor`` x the kept rows' mean norm and the biases of
    :func:`feature_mean_biases` plus ``offset``, exactly as the real new rows will.
    """
    num = len(seen_rows)
    target, old, responses = synthetic_scores(seen_rows, held_out, predicted_rows, features, feature_mean)
    # The best new row does not depend on the factor, only its margin does.
    best_old, arg_old = old.max(dim=1)
    best_new, arg_new = responses.max(dim=1)
    factor = torch.tensor(list(factors), dtype=torch.float32)[:, None]
    wins = target + offset + factor * best_new[None] > best_old[None]
    return gzsl_accuracies(wins, arg_old, arg_new, labels, held_out, num)


def synthetic_scores(
    seen_rows: torch.Tensor,
    held_out: torch.Tensor,
    predicted_rows: torch.Tensor,
    features: torch.Tensor,
    feature_mean: torch.Tensor,
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """How the kept rows and the calibrated predicted rows score ``features``: ``(target, old, responses)``.

    ``old`` ``[M, N - H]`` are the kept rows' logits. At factor ``f`` and offset ``o`` predicted row ``i``'s logit
    is ``target + o + f * responses[:, i]``: ``target`` is the kept rows' mean logit at the mean feature (the
    feature-mean bias rule), ``responses`` ``[M, H]`` is ``n * u_i . (x - mu)``, with ``u_i`` row ``i``'s unit
    direction and ``n`` the kept rows' mean norm.
    """
    kept = seen_rows[~held_mask(len(seen_rows), held_out)].float()
    target, responses = new_row_responses(kept, predicted_rows, features, feature_mean)
    return target, features @ kept[:, :-1].T + kept[:, -1], responses


def new_row_responses(
    kept_rows: torch.Tensor, predicted_rows: torch.Tensor, features: torch.Tensor, feature_mean: torch.Tensor
) -> tuple[float, torch.Tensor]:
    """``(target, responses)`` of :func:`synthetic_scores`, without the kept rows' logits."""
    mean = feature_mean.float()
    target = float((kept_rows[:, :-1] @ mean + kept_rows[:, -1]).mean())
    units = F.normalize(predicted_rows[:, :-1].float(), dim=1) * kept_rows[:, :-1].norm(dim=1).mean()
    return target, (features - mean) @ units.T


def num_held(holdout_fraction: float, num: int) -> int:
    return min(max(1, round(holdout_fraction * num)), num - 2)


def simulate_injections(
    context: CalibrationContext, holdout_fraction: float, repeats: int, rule: str = "simulate"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Inject some of the model's own classes: ``repeats`` x ``(held-out class indices, their predicted rows)``.

    Each repeat holds out ``holdout_fraction`` of the old classes at random (seeded by ``context.seed``) and
    predicts their rows with ``context.fitted_injector``'s ``predict_left_out`` (their rows out of every blend) when
    the context has one, or else trains a fresh ``context.injector_factory()`` on the others with the same
    descriptors. Computed once per context and settings; ``rule`` names the caller in errors.
    """
    key = ("injections", holdout_fraction, repeats)
    return context.memoized(key, lambda: _simulate_injections(context, holdout_fraction, repeats, rule))


def simulated_features(
    context: CalibrationContext,
    spread: float,
    confidence: float,
    samples: int,
    rule: str = "synthesize",
    neighbour_share: float = 0.0,
    step_size: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`synthesize_features` from the context's statistics (spread x ``feature_std``), once per context.

    ``rule`` names the caller in errors.
    """
    if context.feature_mean is None or context.feature_std is None:
        raise ValueError(f"the {rule!r} calibration needs context.feature_mean and context.feature_std")
    settings = (confidence, samples, context.seed, neighbour_share, step_size)

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        seen_rows = context.seen_rows.detach().float().cpu()
        mean = context.feature_mean.detach().float().cpu()
        scaled = spread * context.feature_std.detach().float().cpu()
        key = (_digest(seen_rows, mean, scaled), *settings)
        if key not in _SYNTHESES:
            # One head's features at a time: they cost memory in proportion to the head.
            for other in [k for k in _SYNTHESES if k[0] != key[0]]:
                del _SYNTHESES[other]
            _SYNTHESES[key] = synthesize_features(
                seen_rows,
                mean,
                scaled,
                confidence,
                samples,
                context.seed,
                neighbour_share=neighbour_share,
                step_size=step_size,
            )
        return _SYNTHESES[key]

    return context.memoized(("features", spread, *settings), compute)


#: This process's syntheses for the last head: later injections into the same head (other names, descriptors or
#: injectors) reuse its features instead of climbing again. Keyed by the content of the head and the settings.
_SYNTHESES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _digest(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()


def _simulate_injections(
    context: CalibrationContext, holdout_fraction: float, repeats: int, rule: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seen_rows, descriptors = context.seen_rows.detach().float().cpu(), context.seen_descriptors
    if descriptors is None or (context.injector_factory is None and context.fitted_injector is None):
        raise ValueError(
            f"the {rule!r} calibration needs context.seen_descriptors and context.injector_factory (or "
            "context.fitted_injector) to re-run the injection on held-out old classes; pass them, or use "
            "calibration='logit-match'"
        )
    descriptors = descriptors.detach().float().cpu()
    if len(descriptors) != len(seen_rows):
        raise ValueError(
            f"context.seen_descriptors has {len(descriptors)} rows but the head has {len(seen_rows)} classes"
        )
    num, held_count = len(seen_rows), num_held(holdout_fraction, len(seen_rows))
    if held_count < 1:
        raise ValueError(f"the {rule!r} calibration needs a head with at least 3 classes, this one has {num}")
    generator = torch.Generator().manual_seed(context.seed)
    out = []
    for repeat in range(repeats):
        perm = torch.randperm(num, generator=generator)
        held, kept = perm[:held_count].sort().values, perm[held_count:].sort().values
        if context.fitted_injector is not None:
            left_out = held if context.seen_index is None else context.seen_index[held]
            predicted = context.fitted_injector().predict_left_out(descriptors[held], left_out)
        else:
            injector = context.injector_factory()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(context.seed + repeat)
                injector.fit(descriptors[kept], seen_rows[kept], descriptors[held])
            predicted = injector.predict(descriptors[held])
        predicted = predicted.detach().float().cpu()
        if predicted.shape != (held_count, seen_rows.shape[1]):
            raise ValueError(
                f"the injector predicted rows of shape {tuple(predicted.shape)} for {held_count} held-out classes of a "
                f"head with rows of width {seen_rows.shape[1]}: predict() must return one row [W | b] per descriptor"
            )
        out.append((held, predicted))
    return out


def largest_keeping(curve: torch.Tensor, factors: Sequence[float], min_seen: float) -> int:
    """Index of the largest factor whose simulated S is at least ``min_seen`` (the smallest factor when none is)."""
    order = sorted(range(len(factors)), key=lambda i: factors[i])
    return max((i for i in order if curve[i, 0] >= min_seen), key=lambda i: factors[i], default=order[0])


def largest_within_budget(curve: torch.Tensor, factors: Sequence[float], max_seen_drop: float) -> int:
    """Index of the largest factor whose simulated S is at most ``max_seen_drop`` below S at the smallest factor."""
    smallest = min(range(len(factors)), key=lambda i: factors[i])
    return largest_keeping(curve, factors, float(curve[smallest, 0]) - max_seen_drop)


def simulation_diagnostics(rule: object, context: CalibrationContext, chosen: torch.Tensor, **extra: object) -> dict:
    """Provenance of a simulation rule's choice: the simulated S, U, H (%) at the chosen factor, and ``extra``."""
    seen_rows = context.seen_rows.detach().float()
    simulated = len(simulated_head(context).seen_rows)
    if simulated < len(seen_rows):
        extra = {"simulated_classes": simulated, **extra}
    s, u, h = (round(float(v), 2) for v in chosen)
    return {
        "old_mean_norm": round(float(mean_norm(seen_rows)), 6),
        "held_out_classes": num_held(rule.holdout_fraction, simulated),
        "repeats": rule.repeats,
        "simulation": "left-out" if context.fitted_injector is not None else "refit",
        **extra,
        "simulated_S": s,
        "simulated_U": u,
        "simulated_H": h,
    }
