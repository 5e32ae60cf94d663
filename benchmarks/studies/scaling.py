"""``inject()`` time and peak memory against the size of the head: N old classes x K new classes.

N = 1000 is lite0's real head; larger heads keep lite0's backbone (so the default calibration runs with its
feature statistics) under random rows drawn like the real ones, named by real ImageNet-12k / 21k classes from
timm. New classes get a name and a description each. Every measurement runs in a fresh process (peak memory is
per process), with the text embeddings already cached (their first computation is reported apart) and the
calibration's choices and the fits dropped from the cache, so each one fits ICIS and simulates the
calibration anew (``--seen-head``: then another process injects other names into the same head, with what those
caches kept). Times are also given as ratios to one lite0 forward pass of 32 images measured in the same run, on
the same device.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.scaling

On a machine with a GPU, ``--device cuda`` puts the model there first, so ICIS trains there too (the check of
the issue: ``--sizes 21843 --counts 1 --device cuda --name cuda``); the GPU's peak memory is reported as well.
``--icis KEY=VALUE ...`` measures ICIS with other settings (e.g. ``row_encoder=false``; values are JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from benchmarks.harness.data import load_model
from benchmarks.harness.results import command_line, record, study_parser

STUDY = "scaling"
HEAD_SIZES = (1000, 2000, 5000, 11821, 21843)
NEW_COUNTS = (1, 100, 1000)


def _head_names(num: int) -> list[str]:
    """Real class names for a head of ``num`` classes: ImageNet-1k, the first ``num`` of 12k, or all of 21k."""
    from timm.data import ImageNetInfo

    subset = "imagenet-1k" if num == 1000 else "imagenet-12k" if num <= 11821 else "imagenet-21k"
    info = ImageNetInfo(subset)
    if info.num_classes() < num:
        raise ValueError(f"{subset} has {info.num_classes()} classes, fewer than {num}")
    return [info.index_to_description(i).split(",")[0].strip() for i in range(num)]


def _model(num: int) -> torch.nn.Module:
    """lite0 with real weights; for ``num != 1000`` a head of random rows with the real rows' statistics."""
    model = load_model("tf_efficientnet_lite0")
    if num != 1000:
        old = model.classifier
        generator = torch.Generator().manual_seed(num)
        head = torch.nn.Linear(old.in_features, num)
        with torch.no_grad():
            head.weight.copy_(torch.randn(num, old.in_features, generator=generator) * old.weight.std())
            head.bias.copy_(old.bias.mean() + torch.randn(num, generator=generator) * old.bias.std())
        model.classifier = head
        model.num_classes = num
    return model.eval()


def _rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    num: int,
    count: int,
    cache_dir: str,
    device: str = "cpu",
    icis: dict | None = None,
    seen_head: bool = False,
    shipped: bool = True,
) -> dict:
    """One ``inject()`` of ``count`` new classes into a head of ``num`` classes on ``device``, ICIS with the settings
    ``icis`` changed: seconds and memory (this process; on CUDA also the GPU's peak).

    Fits and simulates anew unless ``seen_head``: then other names go into a head injected into before, and what
    the caches hold from that injection (the fit, the calibration's choice) is used. Without ``shipped`` the vectors
    the package ships for ImageNet-1k's class texts are not read (what a first injection cost before them).
    """
    from classifier_injection import ICISConfig, InjectionConfig, default_embedder, find_head, inject
    from classifier_injection import cache as embedding_cache

    if not shipped:
        embedding_cache.SHIPPED_DIR = Path(cache_dir) / "no-shipped-vectors"
        embedding_cache._shipped.cache_clear()

    device = torch.device(device)
    model = _model(num).to(device)
    names = _head_names(num)
    embedder = default_embedder()
    embedder.encode(["warm-up"])
    new = [f"{'another' if seen_head else 'new'} class {i}" for i in range(count)]
    descriptions = {name: "an object of a kind this model has never seen" for name in new}
    for cached in () if seen_head else ("calibration", "fits"):  # the choices and the fits: fit and simulate anew
        shutil.rmtree(Path(cache_dir) / cached, ignore_errors=True)
    head_mb = find_head(model).rows(model).numel() * 4 / 2**20
    before = _rss_mb("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _synchronize(device)
    start = time.perf_counter()
    config = InjectionConfig(icis=ICISConfig(**icis)) if icis else None
    with _phase_seconds() as phases:
        out = inject(
            model, new, config, descriptions=descriptions, class_names=names, embedder=embedder, cache=cache_dir
        )
    _synchronize(device)
    seconds = time.perf_counter() - start
    peak = _rss_mb("VmHWM")
    record = out.classifier_injection["injections"][-1]
    gpu = {"gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}
    return {
        "seconds": seconds,
        **gpu,
        "rss_before_mb": before,
        "peak_mb": peak,
        "extra_peak_mb": peak - before,
        "head_mb": head_mb,
        "epochs": record["hparams"].get("epochs_trained"),
        "fit_seconds": phases.get("fit"),
        "calibration_seconds": phases.get("calibration"),
        "simulated_classes": record["calibration"]["diagnostics"].get("simulated_classes", num),
    }


@contextlib.contextmanager
def _phase_seconds() -> Iterator[dict[str, float]]:
    """The seconds of the fit and the calibration of the ``inject()`` run inside (read from its row prediction)."""
    from classifier_injection import api

    phases: dict[str, float] = {}
    original = api.predict_rows

    def timed(*args: object, **kwargs: object) -> object:
        prediction = original(*args, **kwargs)
        phases.update(prediction.seconds)
        return prediction

    api.predict_rows = timed
    try:
        yield phases
    finally:
        api.predict_rows = original


@torch.no_grad()
def _best_seconds(work: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The best of ``repeats`` timed calls of ``work`` on ``device``, after one untimed call (warm-up)."""
    work()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        work()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    """The best of ``repeats`` float32 ``size^3`` matrix products on ``device``, in GFLOP/s: the ceiling of a fit."""
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device) for _ in range(2))
    return 2 * size**3 / _best_seconds(lambda: a @ b, repeats, device) / 1e9


def forward_seconds(repeats: int = 3, device: str = "cpu") -> float:
    """The best of ``repeats`` lite0 forward passes of 32 images (224 px) on ``device``, after a warm-up."""
    device = torch.device(device)
    model = load_model("tf_efficientnet_lite0").to(device)
    images = torch.randn(32, 3, 224, 224, device=device)
    return _best_seconds(lambda: model(images), repeats, device)


def _in_subprocess(num: int, count: int, cache_dir: str, device: str, icis: dict, *flags: str) -> dict:
    """:func:`measure` in a fresh process; ``flags``: the worker's ``--other-names`` and ``--no-shipped``."""
    command = [sys.executable, "-m", "benchmarks.studies.scaling", "--worker", str(num), str(count), cache_dir]
    command += ["--device", device, *flags]
    if icis:
        command += ["--icis", *(f"{key}={json.dumps(value)}" for key, value in icis.items())]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement N={num} K={count} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def icis_settings(pairs: Sequence[str]) -> dict:
    """``["row_encoder=false", ...]`` as ICISConfig settings, checked against it (``ValueError`` otherwise)."""
    from classifier_injection import ICISConfig

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f'{pair!r}: the value must be JSON (true, 64, 0.5, "mse")') from err
    try:
        ICISConfig(**settings)
    except TypeError as err:
        raise ValueError(str(err)) from err
    return settings


def exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """The least-squares slope of log(seconds) against log(N): time ~ N^exponent (NaN for fewer than two sizes)."""
    if len(set(sizes)) < 2:
        return math.nan
    x = [math.log(n) for n in sizes]
    y = [math.log(s) for s in seconds]
    mx, my = sum(x) / len(x), sum(y) / len(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sum((a - mx) ** 2 for a in x)


def _row_list(title: str, rows: list[dict], describe: Callable[[dict], str]) -> list[str]:
    """``title`` and a bullet ``- N = .., K = ..: describe(row)`` per row; nothing without rows."""
    if not rows:
        return []
    return ["", title, "", *(f"- N = {r['num']}, K = {r['count']}: {describe(r)}" for r in rows)]


def table(results: dict) -> str:
    """The markdown table of a run."""
    forward = results["forward_seconds"]
    device = results.get("device", "cpu")
    lines = [
        "### inject() against the head size (embeddings cached, calibration simulated anew, one process each)",
        "",
        f"Device: {device}. One lite0 forward pass of 32 images there: {forward:.2f} s.",
        *(
            [f"A float32 2048^3 matrix product there: {results['matmul_gflops']:.1f} GFLOP/s."]
            if "matmul_gflops" in results
            else []
        ),
        *([f"ICIS settings changed: {json.dumps(results['icis'])}."] if results.get("icis") else []),
        "",
        "| N old | K new | seconds | x forward | peak MiB | extra peak MiB | head MiB | extra / head | epochs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['num']} | {row['count']} | {row['seconds']:.1f} | {row['seconds'] / forward:.1f} | "
            f"{row['peak_mb']:.0f} | {row['extra_peak_mb']:.0f} | {row['head_mb']:.0f} | "
            f"{row['extra_peak_mb'] / row['head_mb']:.1f} | {row['epochs']} |"
        )
    rows = results["rows"]
    lines += _row_list(
        "Of which the ICIS fit and the calibration (seconds):",
        [r for r in rows if r.get("fit_seconds") is not None],
        lambda r: f"fit {r['fit_seconds']:.1f}, calibration {r['calibration_seconds']:.1f}",
    )
    lines += _row_list(
        "Other names into a head injected into before (the caches kept from that injection):",
        [r for r in rows if "seen_head" in r],
        lambda r: (
            f"{r['seen_head']['seconds']:.1f} s ({r['seen_head']['seconds'] / forward:.1f} forward passes), "
            f"{r['seen_head']['epochs']} epochs"
        ),
    )
    lines += _row_list(
        "GPU peak memory (MiB) during inject():",
        [r for r in rows if "gpu_peak_mb" in r],
        lambda r: f"{r['gpu_peak_mb']:.0f}",
    )
    fitted = {k: e for k, e in results["exponents"].items() if not math.isnan(e)}
    if fitted:
        lines += ["", "Fitted exponent of time vs N (least squares on log-log):", ""]
        lines += [f"- K = {k}: {e:.2f}" for k, e in fitted.items()]
    lines += ["", "First injection (K = 1) before the class texts were embedded, whole process:", ""]
    lines += [f"- N = {n}: {s:.1f} s" for n, s in results["cold_embedding_seconds"].items()]
    if results.get("cold_inject_seconds"):
        unshipped = results.get("cold_inject_seconds_unshipped", {})
        lines += ["", "The same, inject() alone (without the vectors the package ships for ImageNet-1k's texts):", ""]
        lines += [
            f"- N = {n}: {s:.1f} s" + (f" ({unshipped[n]:.1f} s)" if n in unshipped else "")
            for n, s in results["cold_inject_seconds"].items()
        ]
    ratio = results["ratios"]["11821_over_1000"]
    if not math.isnan(ratio):
        lines += ["", f"time(11821) / time(1000), K = 1: {ratio:.1f}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.scaling") -> None:
    parser = study_parser(prog, __doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(HEAD_SIZES), help="head sizes N")
    parser.add_argument("--counts", type=int, nargs="+", default=list(NEW_COUNTS), help="new classes K")
    parser.add_argument("--name", default=STUDY, help="run name in benchmarks/results/scaling")
    parser.add_argument("--device", default="cpu", help="where the model (and so ICIS) runs: cpu or cuda")
    parser.add_argument("--icis", nargs="+", default=[], metavar="KEY=VALUE", help="ICISConfig settings (JSON values)")
    parser.add_argument("--worker", nargs=3, metavar=("N", "K", "CACHE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--seen-head",
        action="store_true",
        help="after each measurement, inject as many other names into the same head with what the caches kept",
    )
    parser.add_argument("--other-names", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-shipped", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available here; use --device cpu")
    try:
        icis = icis_settings(args.icis)
    except ValueError as err:
        parser.error(f"--icis: {err}")
    if args.worker:
        num, count, cache_dir = int(args.worker[0]), int(args.worker[1]), args.worker[2]
        print(json.dumps(measure(num, count, cache_dir, args.device, icis, args.other_names, not args.no_shipped)))
        return
    cache_dir = tempfile.mkdtemp(prefix="scaling-cache-")
    rows, cold, cold_inject, unshipped = [], {}, {}, {}
    for num in args.sizes:
        start = time.perf_counter()
        first = _in_subprocess(num, 1, cache_dir, args.device, icis)  # embeds the head's class texts once
        cold[str(num)], cold_inject[str(num)] = time.perf_counter() - start, first["seconds"]
        print(f"N={num}: first injection with cold embeddings {cold[str(num)]:.1f} s (process included)", flush=True)
        if num == 1000:  # the head whose class texts the package ships vectors for
            empty = tempfile.mkdtemp(prefix="scaling-cache-")
            unshipped[str(num)] = _in_subprocess(num, 1, empty, args.device, icis, "--no-shipped")["seconds"]
            shutil.rmtree(empty, ignore_errors=True)
        for count in args.counts:
            row = {"num": num, "count": count, **_in_subprocess(num, count, cache_dir, args.device, icis)}
            if args.seen_head:
                again = _in_subprocess(num, count, cache_dir, args.device, icis, "--other-names")
                row["seen_head"] = {key: again[key] for key in ("seconds", "extra_peak_mb", "epochs")}
            rows.append(row)
            print(f"N={num} K={count}: {row['seconds']:.1f} s, extra peak {row['extra_peak_mb']:.0f} MiB", flush=True)
    shutil.rmtree(cache_dir, ignore_errors=True)
    by_count = {k: [r for r in rows if r["count"] == k] for k in args.counts}
    results = {
        "device": args.device,
        "icis": icis,
        "forward_seconds": forward_seconds(device=args.device),
        "matmul_gflops": matmul_gflops(args.device),
        "rows": rows,
        "cold_embedding_seconds": cold,
        "cold_inject_seconds": cold_inject,
        "cold_inject_seconds_unshipped": unshipped,
        "exponents": {
            str(k): exponent([r["num"] for r in rs], [r["seconds"] for r in rs]) for k, rs in by_count.items()
        },
    }
    times = {r["num"]: r["seconds"] for r in by_count[min(args.counts)]}
    results["ratios"] = {"11821_over_1000": times.get(11821, math.nan) / times.get(1000, math.nan)}
    text = table(results)
    print(text)
    record(STUDY, args.name, results, text, command_line(prog, argv), title="inject() at any head size")


if __name__ == "__main__":
    main()
