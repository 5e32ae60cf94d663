"""The main benchmark: ICIS and the paper's baselines on real ImageNet heads and photos, identical splits.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run            # everything (see benchmarks/README.md)
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.run --quick    # one fold, lite0, MiniLM: ICIS, ridge, ConSE

(``python -m benchmarks.studies.benchmark`` is the same.) Stages, in order, run one after the other (each result is
written as soon as it exists, so an interrupted run keeps what it did):

1. ``main``: ``tf_efficientnet_lite0`` + ``minilm-default`` (what ``inject()`` builds from class names), every
   method, 5 folds (ICIS with the paper's settings: fold 0 only, it is slow).
2. ``sources``: ``tf_efficientnet_lite0``, ICIS, VGSE-SMO and ridge on the other descriptor sources.
3. ``models``: ``tf_efficientnet_lite1/2`` + ``minilm-default``, ICIS and ridge.
4. ``speed``: training time of the default vs the paper's settings, and ``inject()`` latency for 1, 100 and 1000
   new classes (:func:`inject_latency`). ``latency`` (not in the default list) measures the latencies alone.
5. ``user`` (not in the default list: hours on 2 cores): the user regime (:mod:`benchmarks.harness.user_regime`),
   ``K`` classes removed and injected back by name through ``inject()``, every draw of :data:`USER_PLAN`
   (``--user-draws N``: at most ``N`` per line of the plan), ICIS and the baselines, both name regimes.

Per-fold results are cached in ``benchmarks/.cache/results`` (keyed by model, descriptors, method, fold and the
method's hyper-parameters and calibration); ``--fresh`` ignores results computed before this run. Output: run
``--name`` of ``benchmarks/results/benchmark/`` (``results.json``, ``README.md``, ``<name>_*.png``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness.calibration import forget_choices
from benchmarks.harness.data import CACHE, fold_classes, head_data, load_model
from benchmarks.harness.descriptors import embedding_cache, fold_descriptors
from benchmarks.harness.methods import METHODS, Method, run_any
from benchmarks.harness.metrics import evaluate_rows, oracle, seen_mask
from benchmarks.harness.results import command_line, machine, record, study_dir
from benchmarks.harness.user_regime import REGIMES, SCALES, inject_draw, make_draw, score_rows, summarize
from classifier_injection import __version__
from classifier_injection.calibration import get_calibration
from classifier_injection.calibration.reliability import scale_for_precision

STUDY = "benchmark"
TITLE = "Benchmark: ICIS and the paper's baselines on real ImageNet heads"
RESULT_CACHE = CACHE / "results"
METRICS = ("zsl", "seen", "unseen", "h", "cosine")


def _log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: Cache keys of the results computed by this run: ``--fresh`` reuses these, not older ones.
_COMPUTED_THIS_RUN: set[str] = set()
#: The library's default descriptors (what inject() builds from class names); the photo prompt is a source.
MAIN_SOURCE = "minilm-default"
SECOND_MODELS = ("tf_efficientnet_lite1", "tf_efficientnet_lite2")
MODEL_METHODS = ("ridge", "icis")
SOURCE_METHODS = ("ridge", "icis", "vgse-smo")


def _calibration_id(method: Method) -> str:
    """The calibration a result was computed with; the library default is spelled out, so a cached result
    computed under an older default is not reused."""
    rule = get_calibration(method.calibration)
    return f"{method.calibration}: {rule!r}"


def _key(model: str, source: str, method: str, fold: int) -> str:
    return f"{model}__{source}__{method}__fold{fold}"


def run_one(model: str, source: str, method: Method, fold: int, *, fresh: bool = False) -> dict:
    """One (model, descriptors, method, fold) result, from the cache when it was computed before.

    With ``fresh``, only results computed by this run are reused (the speed stage reuses the main stage's fits).
    """
    injector = method.build()
    hparams = injector.hparams()
    key = _key(model, source, method.name, fold)
    cached = _cached_result(key, method, hparams, fresh)
    if cached is not None:
        return cached
    data = head_data(model)
    held = fold_classes(fold)
    descriptors = fold_descriptors(source, held)
    start = time.perf_counter()
    result = run_any(data, held, descriptors, injector, method.calibration)
    if method.calibration == "none":
        # Also score the same rows with the no-refit image-free calibration: the paper's rows in GZSL.
        seen_rows = data.rows[seen_mask(len(data.rows), held)]
        rows = get_calibration("logit-match")(injector.predict(descriptors[held]), seen_rows)
        result["logit_match"] = evaluate_rows(data, held, rows)
    if hasattr(injector, "history"):
        result["epochs"] = len(injector.history)
    result.update(
        model=model,
        source=source,
        method=method.name,
        fold=fold,
        hparams=json.loads(json.dumps(hparams)),
        calibration=_calibration_id(method),
        seconds=time.perf_counter() - start,
        peak_rss_mb=_peak_rss_mb(),
        measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return _store_result(key, result)


def _cached_result(key: str, method: Method, hparams: dict, fresh: bool) -> dict | None:
    """The cached result under ``key`` if it was computed with ``hparams`` and ``method``'s calibration (with
    ``fresh``: by this run), else ``None``."""
    path = RESULT_CACHE / f"{key}.json"
    if (fresh and key not in _COMPUTED_THIS_RUN) or not path.is_file():
        return None
    cached = json.loads(path.read_text())
    same = cached.get("hparams") == json.loads(json.dumps(hparams)) and cached.get("calibration") == _calibration_id(
        method
    )
    return cached if same else None


def _store_result(key: str, result: dict) -> dict:
    """Write ``result`` to the per-result cache under ``key`` and return it."""
    RESULT_CACHE.mkdir(parents=True, exist_ok=True)
    (RESULT_CACHE / f"{key}.json").write_text(json.dumps(result, indent=1))
    _COMPUTED_THIS_RUN.add(key)
    return result


def oracle_result(model: str, fold: int) -> dict:
    return {**oracle(head_data(model), fold_classes(fold)), "fold": fold, "fit_seconds": 0.0}


def mean_over_folds(results: list[dict]) -> dict:
    out = {key: float(np.mean([r[key] for r in results])) for key in (*METRICS, "fit_seconds") if key in results[0]}
    out["folds"] = [r["fold"] for r in results]
    if "calibration_seconds" in results[0]:
        out["calibration_seconds"] = float(np.mean([r["calibration_seconds"] for r in results]))
    return out


def run_grid(
    model: str,
    source: str,
    methods: list[str],
    folds: list[int],
    fresh: bool,
    into: dict,
    on_update: Callable[[], None] = lambda: None,
) -> None:
    """Fill ``into[model][source][method]`` with per-fold results and their mean; oracle included.

    ``on_update`` is called after every fold (the caller saves the partial report).
    """
    table = into.setdefault(model, {}).setdefault(source, {})
    oracle = [oracle_result(model, k) for k in folds]
    table["oracle"] = {"mean": mean_over_folds(oracle), "per_fold": oracle}
    for name in methods:
        method = METHODS[name]
        per_fold = []
        for k in folds[:1] if method.first_fold_only else folds:
            result = run_one(model, source, method, k, fresh=fresh)
            _log(
                f"{model} {source} {name} fold {k}: ZSL {result['zsl']:.1f} S {result['seen']:.1f} "
                f"U {result['unseen']:.1f} H {result['h']:.1f} cos {result['cosine']:.3f} "
                f"fit {result['fit_seconds']:.1f}s"
            )
            per_fold.append(result)
            table[name] = {"mean": mean_over_folds(per_fold), "per_fold": per_fold, "description": method.description}
            on_update()


# ---------------------------------------------------------------------------------------------------------------
# User regime

#: The injectors of the user regime: ICIS (the default) and every baseline that injects rows.
USER_METHODS = ("icis", "ridge", "costa", "vgse-wavg", "vgse-smo", "mlp", "subreg")
#: The closed-form ones (a second each; MLP and Sub.Reg. train for about a minute per injection).
FAST_USER_METHODS = ("icis", "ridge", "costa", "vgse-wavg", "vgse-smo")
#: Ways to make ICIS rows discriminate against their neighbours (``benchmarks.harness.research_injectors``), ICIS
#: without the row encoder's terms or trained 20 epochs of batch 32 (faster fits), ICIS whose calibration simulation
#: refits it (a second fit) and ICIS with or without the new classes' descriptors in its fit; run when asked for
#: (``--methods``: on every model; ``--user-methods``: on the main case).
ROW_VARIANTS = (
    "icis-no-row-encoder",
    "icis-batch32",
    "icis-batch32-30",
    "icis-no-new-descriptors",
    "icis-refit",
    "icis-loo",
    "icis-sharp",
    "icis-flat",
    "icis+vgse-smo",
    "icis-contrast",
    "icis-separated",
    "icis-feature-separated",
    "icis-residual",
    "icis-residual10",
)
#: (model, K, draws, methods) of the user regime: what the protocol asks for (issue "New classes a user can
#: trust"); every baseline on the main case, the closed-form ones elsewhere.
USER_PLAN: tuple[tuple[str, int, int, tuple[str, ...]], ...] = (
    ("tf_efficientnet_lite0", 10, 8, USER_METHODS + ROW_VARIANTS),
    ("tf_efficientnet_lite0", 50, 4, FAST_USER_METHODS),
    ("tf_efficientnet_lite0", 1, 40, FAST_USER_METHODS),
    ("tf_efficientnet_lite1", 10, 8, FAST_USER_METHODS),
    ("tf_efficientnet_lite2", 10, 8, FAST_USER_METHODS),
)


#: Methods whose injected rows the per-draw cache keeps (for studies of the rows and the expected rates).
_ROWS_KEPT = ("icis", "vgse-smo")


def run_user_draw(
    model: str, k: int, draw: int, regime: str, method: Method, embedder, fresh: bool, embedder_key: str = ""
) -> dict:
    """One draw's counts per ``new_class_scale`` for one regime and method, from the cache when computed before.

    ``embedder_key`` names a text embedder other than the default in the cache key.
    """
    hparams = json.loads(json.dumps(method.build().hparams()))
    key = f"user__{model}__K{k}__draw{draw}__{regime}__{method.name}" + (f"__{embedder_key}" if embedder_key else "")
    cached = _cached_result(key, method, hparams, fresh)
    # Results from before the record had its expected rates and their curve are measured again.
    current = cached is not None and "curve" in (cached.get("expected") or {})
    if current and ("rows" in cached or method.name not in _ROWS_KEPT):
        return cached
    spec = make_draw(model, k, draw)
    start = time.perf_counter()
    # ICIS goes the way of a user's call: inject() builds its default injector.
    injector = None if method.name == "icis" else method.build()
    rows, injection = inject_draw(spec, regime, injector=injector, embedder=embedder)
    result = {
        "names": spec.names,
        "counts": score_rows(spec, rows),
        "reliability": [injection["reliability"][name] for name in spec.names],
        "expected": injection.get("expected"),
        "rows": rows.tolist() if method.name in _ROWS_KEPT else None,
        "hparams": hparams,
        "calibration": _calibration_id(method),
        "seconds": time.perf_counter() - start,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return _store_result(key, result)


def _expected_vs_measured(result: dict) -> list[dict]:
    """Per new class of a draw: what ``inject()`` expected (its ``reliability`` record) and what the photos gave."""
    if "reliability" not in result:
        return []
    return [
        {
            "name": name,
            "expected_precision": expected.get("expected_precision"),
            "expected_recall": expected.get("expected_recall"),
            **measured,
        }
        for name, expected, measured in zip(
            result["names"], result["reliability"], result["counts"]["per_class"], strict=True
        )
    ]


def mean_expected(records: Sequence[dict | None]) -> dict | None:
    """The mean over draws of what ``inject()`` expected (its ``expected`` record), or ``None`` without one."""
    records = [r for r in records if r]
    if not records:
        return None
    out = {"draws": len(records), "simulated_new_classes": records[0].get("simulated_new_classes")}
    for key in ("recall", "precision", "stolen_per_class"):
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    return out


#: ``InjectionConfig(target_precision=)`` values the user regime measures for ICIS.
TARGET_PRECISIONS = (0.3, 0.4)


def draw_targets(spec, result: dict, targets: Sequence[float] = TARGET_PRECISIONS) -> dict[str, dict]:
    """One draw, per target precision: the scale ``InjectionConfig(target_precision=target)`` picks from the
    draw's expected curve and the photos' counts with the new rows scaled by it (none without a curve or rows)."""
    curve = (result.get("expected") or {}).get("curve")
    if not curve or result.get("rows") is None:
        return {}
    table = {"new_classes": [spec.k], "scales": curve["scales"], "precision": [curve["precision"]]}
    rows = torch.tensor(result["rows"])
    out = {}
    for target in targets:
        found = scale_for_precision(table, spec.k, 100 * target)
        if found is not None:
            out[str(target)] = {"scale": found[0], "counts": score_rows(spec, rows, [found[0]])[str(found[0])]}
    return out


def target_entries(per_draw: Sequence[dict[str, dict]]) -> dict:
    """Per target precision, over the draws of :func:`draw_targets`: the photos' rates and the scales picked."""
    out = {}
    for target in {t for draw in per_draw for t in draw}:
        picked = [draw[target] for draw in per_draw if target in draw]
        out[target] = {"summary": summarize([p["counts"] for p in picked]), "scales": [p["scale"] for p in picked]}
    return dict(sorted(out.items()))


def user_entry(per_draw: list[dict]) -> dict:
    """A method's rates at the default scale and its precision-recall curve over :data:`SCALES`."""
    curve = [{"scale": scale, **summarize([d[str(scale)] for d in per_draw])} for scale in SCALES]
    return {"summary": summarize([d["1.0"] for d in per_draw]), "curve": curve}


def run_user(
    methods: list[str],
    max_draws: int | None,
    cases: list[str] | None,
    fresh: bool,
    into: dict,
    on_update: Callable[[], None],
    regimes: Sequence[str] = tuple(REGIMES),
    embedders: Sequence[str] = (),
) -> None:
    """Fill ``into[model][K]`` with the ceiling and ``[regime][method]`` entries, every draw of :data:`USER_PLAN`
    (or of its ``cases``, ``"model:K"``); ``embedders``: sentence-transformers models (``"default"``: the library's)
    to use instead of the default, their vectors concatenated when there are several."""
    from benchmarks.harness.data import head_data
    from classifier_injection import SentenceTransformerEmbedder, default_embedder
    from classifier_injection.descriptors import CombinedEmbedder

    parts = [default_embedder() if e == "default" else SentenceTransformerEmbedder(e) for e in embedders]
    embedder = default_embedder() if not parts else parts[0] if len(parts) == 1 else CombinedEmbedder(parts)
    embedder_key = "+".join(Path(e).name for e in embedders)
    for model, k, planned, planned_methods in USER_PLAN:
        if cases is not None and f"{model}:{k}" not in cases:
            continue
        draws = range(min(planned, max_draws or planned))
        table = into.setdefault(model, {}).setdefault(str(k), {"planned_draws": planned})
        rows = head_data(model).rows
        specs = [make_draw(model, k, d) for d in draws]
        table["ceiling"] = user_entry([score_rows(spec, rows[torch.as_tensor(spec.removed)]) for spec in specs])
        results: dict[tuple[str, str], list[dict]] = {}  # the draws so far; the report keeps their rates
        targets: dict[tuple[str, str], list[dict]] = {}  # ICIS's per-draw draw_targets, scored once each
        for draw in draws:
            for regime in regimes:
                for name in (m for m in planned_methods if m in methods):
                    result = run_user_draw(model, k, draw, regime, METHODS[name], embedder, fresh, embedder_key)
                    done = results.setdefault((regime, name), [])
                    done.append(result)
                    table.setdefault(regime, {})[name] = {
                        **user_entry([r["counts"] for r in done]),
                        "seconds": [round(r["seconds"], 1) for r in done],
                    }
                    if name == "icis":  # the default's record is the one the report checks against the photos
                        table[regime][name]["reliability"] = [_expected_vs_measured(r) for r in done]
                        table[regime][name]["expected"] = mean_expected([r.get("expected") for r in done])
                        picked = targets.setdefault((regime, name), [])
                        picked.append(draw_targets(specs[draw], result))
                        table[regime][name]["targets"] = target_entries(picked)
                    s = table[regime][name]["summary"]
                    _log(
                        f"user {model} K={k} draw {draw} {regime} {name}: recall {s['recall']:.0f} "
                        f"precision {s['precision']:.0f} top-5 {s['top5_recall']:.0f} ({result['seconds']:.0f}s)"
                    )
            on_update()


# ---------------------------------------------------------------------------------------------------------------
# Speed


def speed(fresh: bool) -> dict:
    """Training time ratio default vs paper settings (fold 0, one run each) and inject() latency."""
    out: dict = {}
    default = run_one("tf_efficientnet_lite0", MAIN_SOURCE, METHODS["icis"], 0, fresh=fresh)
    paper = run_one("tf_efficientnet_lite0", MAIN_SOURCE, METHODS["icis-paper"], 0, fresh=fresh)
    out["train_seconds"] = {"icis_default": default["fit_seconds"], "icis_paper": paper["fit_seconds"]}
    out["train_speedup_paper_over_default"] = paper["fit_seconds"] / default["fit_seconds"]
    out["epochs"] = {"icis_default": default.get("epochs"), "icis_paper": paper.get("epochs")}
    out["peak_rss_mb_after"] = {"icis_default": default["peak_rss_mb"], "icis_paper": paper["peak_rss_mb"]}
    latency = inject_latency()
    out["inject_latency_seconds"] = latency.pop("first")
    out["inject_latency_later_seconds"] = latency
    return out


def new_class_names(count: int) -> list[str]:
    """Names of ImageNet-21k classes that are not ImageNet-1k classes (realistic new classes)."""
    from timm.data import ImageNetInfo

    # Compared as inject() compares names (case and spacing ignored): "Jersey" (the cattle) is "jersey".
    known = {" ".join(d.split(",")[0].split()).casefold() for d in ImageNetInfo("imagenet-1k").label_descriptions()}
    names: list[str] = []
    for description in ImageNetInfo("imagenet-21k").label_descriptions():
        name = description.split(",")[0].strip()
        key = " ".join(name.split()).casefold()
        if key not in known:
            known.add(key)
            names.append(name)
        if len(names) == count:
            return names
    raise RuntimeError(f"fewer than {count} new class names available")


def inject_latency(counts: tuple[int, ...] = (1, 100, 1000)) -> dict:
    """Wall time of ``inject()`` (library defaults) on lite0, the default embedder loaded and warm.

    Per count, three calls, each with ``count`` names never embedded before: ``first``, into a head the calibration
    has not seen (its cached choices are cleared, so it simulates; the warm-up injection has left the synthesised
    features in this process, so it fits and simulates but does not climb them again: the scaling study times a
    fresh process); ``same_head``, other names into the same head
    (the fit, and so the simulation that reuses it, depend on the names); ``trained_injector``, passing an ICIS
    injector trained on this head before (no fit: how batches of new classes are meant to be injected); and
    ``same_call``, the ``first`` call again, names included (a script run again: its fit and the calibration's
    choice are read from :class:`classifier_injection.cache.FitCache` and
    :mod:`classifier_injection.calibration.cache`).
    """
    from classifier_injection import ICISInjector, default_embedder, inject

    model = load_model("tf_efficientnet_lite0")
    embedder = default_embedder()
    embedder.encode(["warm-up"])  # loads the model: excluded from the latency, as the issue asks
    cache = embedding_cache()
    trained = ICISInjector(seed=0)
    # Caches the seen classes' embeddings and trains `trained` on this head.
    inject(model, ["warm-up class"], embedder=embedder, cache=cache, injector=trained)
    out: dict = {"first": {}, "same_head": {}, "trained_injector": {}, "same_call": {}}
    calls = (("first", None), ("same_head", None), ("trained_injector", trained), ("same_call", None))
    unused = iter(new_class_names(sum(counts) * len(calls)))  # fresh names: their embeddings are not cached
    for count in counts:
        forget_choices()
        named: dict[str, list[str]] = {}
        for call, injector in calls:
            names = named["first"] if call == "same_call" else [next(unused) for _ in range(count)]
            named[call] = names
            start = time.perf_counter()
            inject(model, names, embedder=embedder, cache=cache, injector=injector)
            out[call][str(count)] = time.perf_counter() - start
            _log(f"inject() with {count} new classes ({call}): {out[call][str(count)]:.1f}s")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Reports


def markdown(report: dict) -> str:
    lines = [
        f"# Benchmark results ({report['name']})",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}, classifier_injection {report['version']}, "
        f"{report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']}, "
        f"load average at start {report['machine']['load_average_at_start'][0]:.1f}, "
        f"total {report['total_seconds'] / 60:.1f} min.",
        "",
    ]
    if report["results"]:
        lines += [
            "ZSL: top-1 among the held-out classes; S / U: accuracy on seen / held-out photos with the extended "
            "1000-way head; H = 2SU/(S+U); cos: mean cosine of injected vs true weight vectors; fit: injector "
            "training seconds (calibration excluded). Means over the listed folds.",
            "",
        ]
    for model, sources in report["results"].items():
        for source, table in sources.items():
            lines += [
                f"## {model}, descriptors {source}",
                "",
                "| method | folds | ZSL | S | U | H | cos | fit s |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for name, entry in table.items():
                m = entry["mean"]
                cos = "" if np.isnan(m["cosine"]) else f"{m['cosine']:.3f}"
                lines.append(
                    f"| {name} | {len(m['folds'])} | {m['zsl']:.1f} | {m['seen']:.1f} | {m['unseen']:.1f} | "
                    f"{m['h']:.1f} | {cos} | {m['fit_seconds']:.1f} |"
                )
                for r in entry.get("per_fold", []):
                    if "logit_match" in r:
                        lm = r["logit_match"]
                        lines.append(
                            f"| {name} + logit-match calibration (fold {r['fold']}) | 1 | {lm['zsl']:.1f} | "
                            f"{lm['seen']:.1f} | {lm['unseen']:.1f} | {lm['h']:.1f} | {lm['cosine']:.3f} | |"
                        )
            lines.append("")
    if "speed" in report:
        s = report["speed"]
        lines += [
            f"## Speed (ICIS, lite0, {MAIN_SOURCE}, fold 0, one run each)",
            "",
            f"- training: library default {s['train_seconds']['icis_default']:.1f} s "
            f"({s['epochs']['icis_default']} epochs), paper settings {s['train_seconds']['icis_paper']:.1f} s "
            f"({s['epochs']['icis_paper']} epochs): ratio {s['train_speedup_paper_over_default']:.1f}x",
            f"- process peak RSS after the fits: {s['peak_rss_mb_after']['icis_default']:.0f} MB (default), "
            f"{s['peak_rss_mb_after']['icis_paper']:.0f} MB (paper)",
            "- inject() latency (library defaults, embedder loaded): "
            + ", ".join(f"{k} new: {v:.1f} s" for k, v in s["inject_latency_seconds"].items()),
        ]
        lines += [*_later_lines(s["inject_latency_seconds"], s.get("inject_latency_later_seconds", {})), ""]
    if "user" in report:
        lines += user_markdown(report["user"])
    if "latency" in report:
        first = report["latency"]["first"]
        lines += [
            "## inject() latency (lite0, library defaults, embedder loaded, one run each)",
            "",
            "- first injection into the head: " + ", ".join(f"{k} new: {v:.1f} s" for k, v in first.items()),
            *_later_lines(first, report["latency"]),
            "",
        ]
    return "\n".join(lines)


def user_markdown(user: dict) -> list[str]:
    """The user regime's tables: one per model and ``K``, the ceiling first."""
    lines = []
    for model, by_k in user.items():
        for k, table in by_k.items():
            draws = table["ceiling"]["summary"]["draws"]
            lines += [
                f"## User regime: {model}, K = {k} classes removed and injected back by name",
                "",
                f"Draws 0..{draws - 1} of the {table['planned_draws']} planned; `inject()` with the library defaults "
                "(baselines as `injector=`), full head, one photo per class. Recall / precision / top-5 recall in %, "
                "pooled over the draws; stolen: old photos taken by a new class, per new class; old Δ: old-class "
                "accuracy change in points.",
                "",
                "| regime | method | recall | precision | top-5 recall | stolen / class | old Δ | s / draw |",
                "|---|---|---|---|---|---|---|---|",
                _user_line("true rows", "ceiling", table["ceiling"]),
            ]
            for regime in REGIMES:
                for name, entry in table.get(regime, {}).items():
                    lines.append(_user_line(regime, name, entry))
                    if entry.get("expected"):
                        lines.append(_expected_line(regime, entry["expected"]))
                    for target, measured in entry.get("targets", {}).items():
                        scales = f"scale {min(measured['scales']):.2f}-{max(measured['scales']):.2f}"
                        label = f"{name}, target_precision={target} ({scales})"
                        lines.append(_user_line(regime, label, measured))
            lines += ["", *_reliability_lines(table), ""]
    return lines


def reliability_groups(classes: list[dict], groups: int = 3) -> list[dict]:
    """New classes sorted by expected precision and cut into ``groups``: expected vs measured rates (%) per group.

    Measured: recall = own photos won; precision = own photos won / photos won (pooled within the group).
    """
    rated = sorted((c for c in classes if c["expected_precision"] is not None), key=lambda c: c["expected_precision"])
    out = []
    for part in np.array_split(np.arange(len(rated)), groups) if rated else []:
        members = [rated[i] for i in part]
        wins = sum(c["wins"] for c in members)
        out.append(
            {
                "classes": len(members),
                "expected_precision": float(np.mean([c["expected_precision"] for c in members])),
                "measured_precision": 100 * sum(c["hit"] for c in members) / wins if wins else float("nan"),
                "expected_recall": float(np.mean([c["expected_recall"] or 0.0 for c in members])),
                "measured_recall": 100 * float(np.mean([c["hit"] for c in members])),
            }
        )
    return out


def _reliability_lines(table: dict) -> list[str]:
    lines = []
    for regime in REGIMES:
        entry = table.get(regime, {}).get("icis")
        classes = [c for draw in entry.get("reliability", []) for c in draw] if entry else []
        groups = reliability_groups(classes)
        if not groups:
            continue
        lines += [
            f"ICIS, {regime}: what `inject()` expected of each new class (its `reliability` record) against the "
            "photos, classes in thirds by expected precision:",
            "",
            "| classes | expected precision | measured precision | expected recall | measured recall |",
            "|---|---|---|---|---|",
            *(
                f"| {g['classes']} | {g['expected_precision']:.1f} | {g['measured_precision']:.1f} | "
                f"{g['expected_recall']:.1f} | {g['measured_recall']:.1f} |"
                for g in groups
            ),
            "",
        ]
    return lines


def _expected_line(regime: str, expected: dict) -> str:
    """A table line: what ``inject()`` expected for the default (mean of its ``expected`` records over draws)."""

    def cell(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return (
        f"| {regime} | icis, expected by `inject()` | {cell(expected['recall'])} | {cell(expected['precision'])} | - | "
        f"{cell(expected['stolen_per_class'], 2)} | - | |"
    )


def _user_line(regime: str, name: str, entry: dict) -> str:
    s = entry["summary"]
    seconds = f"{np.mean(entry['seconds']):.0f}" if entry.get("seconds") else ""
    return (
        f"| {regime} | {name} | {s['recall']:.1f} | {s['precision']:.1f} | {s['top5_recall']:.1f} | "
        f"{s['stolen_per_class']:.2f} | {s['old_change']:+.2f} | {seconds} |"
    )


_LATER_CALLS = {
    "same_head": "other names into the same head (a fit again; the simulation reuses it)",
    "trained_injector": "with an ICIS injector trained on this head before (no fit; the simulation uses it)",
    "same_call": "the first call again, same names (its fit and the choice read from the cache)",
}


def _later_lines(first: dict, later: dict) -> list[str]:
    """Report lines for the later calls of :func:`inject_latency`, as speed-ups over the first one."""
    return [
        f"- {text}: " + ", ".join(f"{k} new: {v:.1f} s ({first[k] / v:.1f}x faster)" for k, v in later[call].items())
        for call, text in _LATER_CALLS.items()
        if call in later
    ]


def run(args: argparse.Namespace, command: str) -> dict:
    """Run the stages of ``args`` one after the other; the report is recorded after every fold."""
    start = time.perf_counter()
    report: dict = {
        "name": args.name,
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "version": __version__,
        "machine": machine(),
        "results": {},
    }
    stages = args.stages
    folds = list(range(args.folds))

    def save() -> None:
        report["total_seconds"] = time.perf_counter() - start
        record(STUDY, args.name, report, markdown(report), command, title=TITLE, date=report["date"])

    if "main" in stages:
        run_grid("tf_efficientnet_lite0", MAIN_SOURCE, args.methods, folds, args.fresh, report["results"], save)
        save()
    if "sources" in stages:
        for source in args.sources:
            run_grid("tf_efficientnet_lite0", source, list(SOURCE_METHODS), folds, args.fresh, report["results"], save)
            save()
    if "models" in stages:
        methods = list(MODEL_METHODS) + [m for m in args.methods if m in ROW_VARIANTS]
        for model in SECOND_MODELS:
            run_grid(model, MAIN_SOURCE, methods, folds, args.fresh, report["results"], save)
            save()
    if "speed" in stages:
        report["speed"] = speed(args.fresh)
    if "latency" in stages and "speed" not in stages:  # the speed stage measures it too
        report["latency"] = inject_latency()
    if "user" in stages:
        run_user(
            args.user_methods,
            args.user_draws,
            args.user_cases,
            args.fresh,
            report.setdefault("user", {}),
            save,
            regimes=args.user_regimes,
            embedders=args.user_embedders,
        )
    save()
    if not args.no_plots:
        from benchmarks.harness.plots import plot_report, plot_user_curves

        plot_report(report, study_dir(STUDY))
        if "user" in report:
            plot_user_curves(report, study_dir(STUDY))
    return report


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="ICIS vs the paper's baselines on real ImageNet heads")
    parser.add_argument("--quick", action="store_true", help="one fold, lite0, main descriptors: ICIS, ridge, ConSE")
    parser.add_argument("--stages", nargs="+", default=["main", "sources", "models", "speed"])
    parser.add_argument(
        "--methods", nargs="+", default=[m for m in METHODS if m not in ROW_VARIANTS], choices=list(METHODS)
    )
    parser.add_argument(
        "--sources", nargs="+", default=["minilm-name", "minilm-ensemble", "conceptnet", "wiki2vec", "glove"]
    )
    parser.add_argument("--user-methods", nargs="+", default=list(USER_METHODS), choices=USER_METHODS + ROW_VARIANTS)
    parser.add_argument("--user-regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--user-draws", type=int, default=None, help="user stage: at most N draws per (model, K)")
    parser.add_argument(
        "--user-embedders",
        nargs="+",
        default=[],
        help="user stage: sentence-transformers models (directories or hub names; 'default': the library's) to use "
        "instead of the default, concatenated when several",
    )
    parser.add_argument(
        "--user-cases",
        nargs="+",
        default=None,
        choices=[f"{m}:{k}" for m, k, _, _ in USER_PLAN],
        help="user stage: MODEL:K",
    )
    parser.add_argument("--folds", type=int, default=5, choices=range(1, 6), help="number of folds (from fold 0)")
    parser.add_argument("--name", default=None, help="run name in benchmarks/results/benchmark (default: benchmark)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached per-fold results")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.stages, args.methods, args.folds = ["main"], ["ridge", "conse", "icis"], 1
    args.name = args.name or ("quick" if args.quick else "benchmark")
    return args


def main(argv: list[str] | None = None, prog: str = "benchmarks.studies.benchmark") -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog=f"python -m {prog}")
    report = run(args, command_line(prog, argv))
    print(markdown(report))


if __name__ == "__main__":
    main()
