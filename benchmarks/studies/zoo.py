"""Zoo sweep: run head surgery on every architecture in ``timm.list_models()``.

Each model is built on the meta device (no memory, no weights; its default config) and classified as

* ``supported``: :func:`~classifier_injection.heads.find_head` finds the head, its rows have the expected
  shape, growing it by ``K`` rows gives a forward pass with ``N + K`` outputs, and the grown state dict
  matches ``timm.create_model(name, num_classes=N + K)`` key for key and shape for shape (what
  ``save_injected`` / ``load_injected`` / ``local-dir:`` rely on), whose head is found at the same paths;
* ``refused``: ``find_head`` raised :class:`~classifier_injection.heads.UnsupportedHeadError` (the reason
  is recorded: encoder, ``num_classes=0``, projection head...);
* ``failed``: anything else (the goal is none).

Bit-exactness of old logits needs real numbers: it is checked by the default test suite on 44 small
architectures of every family (``tests/test_heads.py``). ``--real-max-params`` additionally builds every
supported model up to that many parameters on the CPU with random weights and checks the old logits
with ``torch.equal`` (slow: hours for the whole zoo on 2 cores).

Run (about 6 minutes on 2 cores; results: run ``--out`` of ``benchmarks/results/zoo/``)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.zoo                  # every architecture: run "zoo"
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.zoo resnet* levit*   # a subset (fnmatch patterns)
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.harness.data import RESULTS
from benchmarks.harness.results import command_line, record
from classifier_injection.heads import UnsupportedHeadError, find_head

STUDY = "zoo"
NUM_NEW = 2


@dataclass
class ZooResult:
    """The outcome for one architecture."""

    name: str
    status: str  # "supported" | "refused" | "failed"
    family: str = ""
    paths: str = ""
    num_classes: int = 0
    in_features: int = 0
    reason: str = ""
    real_check: str = ""  # "", "exact", or why not
    seconds: float = 0.0


def _build(name: str, device: str | torch.device, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device):
            import timm

            return timm.create_model(name, pretrained=False, **kwargs).eval()


def _input(model: nn.Module, device: str | torch.device) -> torch.Tensor:
    size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size") or (3, 224, 224))
    return torch.randn(1, *size, device=device) if device != "meta" else torch.empty(1, *size, device="meta")


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if isinstance(out, (tuple, list)):  # a few models also return auxiliary outputs
        out = out[0]
    return out


def _refusal_reason(err: UnsupportedHeadError) -> str:
    text = str(err)
    for key, label in (  # first match wins: the no-classifier message also mentions get_classifier()
        ("no classifier to extend", "no classifier (num_classes=0 / Identity head)"),
        ("has no get_classifier", "no get_classifier (encoder only)"),
        ("CLIP-style projection", "projection head (image-text embedding, not classes)"),
        ("combined in a way", "unknown multi-layer head"),
        ("only affine classifiers", "non-affine classifier"),
    ):
        if key in text:
            return label
    return text[:200]


def check_meta(name: str) -> ZooResult:
    """Build ``name`` on the meta device and run the structural checks (see the module docstring)."""
    start = time.perf_counter()
    result = ZooResult(name=name, status="failed")
    try:
        model = _build(name, "meta")
        try:
            head = find_head(model)
        except UnsupportedHeadError as err:
            result.status, result.reason = "refused", _refusal_reason(err)
            return result
        num_classes = head.num_classes
        result.family, result.paths = head.family, head.path
        result.num_classes, result.in_features = num_classes, head.in_features
        rows = head.rows(model)
        if tuple(rows.shape) != (num_classes, head.in_features + 1):
            raise AssertionError(
                f"rows have shape {tuple(rows.shape)}, expected ({num_classes}, {head.in_features + 1})"
            )
        head.grow(model, torch.zeros(NUM_NEW, head.in_features + 1))
        model.num_classes = num_classes + NUM_NEW
        out = _output(model, _input(model, "meta"))
        if out.shape[-1] != num_classes + NUM_NEW:
            raise AssertionError(f"grown model outputs {out.shape[-1]} logits, expected {num_classes + NUM_NEW}")
        regrown = find_head(model)
        if regrown.paths != head.paths or regrown.num_classes != num_classes + NUM_NEW:
            raise AssertionError(f"grown head found as {regrown.path} with {regrown.num_classes} classes")
        # save_injected writes this state dict; load_injected builds this reference and loads it.
        reference = _build(name, "meta", num_classes=num_classes + NUM_NEW)
        ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
        if ours != theirs:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise AssertionError(f"state dict differs from a {num_classes + NUM_NEW}-class model at {diff[:4]}")
        if find_head(reference).paths != head.paths:
            raise AssertionError("the reloaded model's head is found at other paths")
        result.status = "supported"
    except Exception as err:  # every failure is recorded, the sweep goes on
        result.reason = f"{type(err).__name__}: {err}".replace("\n", " ")[:300]
        result.real_check = traceback.format_exc(limit=-2).replace("\n", " | ")[:500]
    finally:
        result.seconds = round(time.perf_counter() - start, 3)
    return result


def check_real(name: str) -> str:
    """Random weights on the CPU: the rows and captured features reproduce the logits, and after growing
    the head the old logits are ``torch.equal`` to the original ones."""
    torch.manual_seed(0)
    model = _build(name, "cpu")
    head = find_head(model)
    x = _input(model, "cpu")
    before = _output(model, x)
    if head.mixing != "volo":  # volo's max over tokens is not rows @ features
        rows = head.rows(model)
        predicted = head.features(model, x) @ rows[:, :-1].T + rows[:, -1]
        if not torch.allclose(predicted, before, rtol=1e-3, atol=1e-3 * before.abs().max().item()):
            return "MISMATCH: rows @ features are not the logits"
    head.grow(model, torch.randn(NUM_NEW, head.in_features + 1))
    after = _output(model, x)
    if after.shape[-1] != head.num_classes + NUM_NEW or not torch.equal(after[..., : head.num_classes], before):
        return "MISMATCH: old logits changed"
    return "exact"


def _num_params(name: str) -> int:
    return sum(p.numel() for p in _build(name, "meta").parameters())


def summarise(results: list[ZooResult], seconds: float) -> str:
    """A markdown summary: counts per status, per family, refusal reasons and every failure."""
    import timm

    status = collections.Counter(r.status for r in results)
    families = collections.Counter(r.family for r in results if r.status == "supported")
    reasons = collections.Counter(r.reason for r in results if r.status == "refused")
    lines = [
        "# Zoo sweep: head surgery on every timm architecture",
        "",
        f"timm {timm.__version__}, torch {torch.__version__}; {len(results)} architectures built on the meta device "
        f"with their default config; {seconds / 60:.1f} min.",
        "",
        "| status | models |",
        "|---|---|",
        *(f"| {s} | {status.get(s, 0)} |" for s in ("supported", "refused", "failed")),
        "",
        "## Supported, by head family",
        "",
        "| family | models | examples |",
        "|---|---|---|",
    ]
    for family, count in families.most_common():
        examples = [r.name for r in results if r.status == "supported" and r.family == family][:4]
        lines.append(f"| {family} | {count} | {', '.join(examples)} |")
    lines += ["", "## Refused, by reason", "", "| reason | models | examples |", "|---|---|---|"]
    for reason, count in reasons.most_common():
        examples = [r.name for r in results if r.status == "refused" and r.reason == reason][:4]
        lines.append(f"| {reason} | {count} | {', '.join(examples)} |")
    real = [r for r in results if r.real_check and r.status == "supported"]
    if real:
        exact = sum(r.real_check == "exact" for r in real)
        lines += ["", f"Real-weight check (CPU, random init): {exact} / {len(real)} exact."]
        lines += [f"- {r.name}: {r.real_check}" for r in real if r.real_check != "exact"]
    failed = [r for r in results if r.status == "failed"]
    lines += ["", f"## Failed ({len(failed)})", ""]
    lines += [f"- {r.name}: {r.reason}" for r in failed] or ["none"]
    return "\n".join(lines) + "\n"


def run(
    patterns: list[str] | None = None,
    real_max_params: int = 0,
    out: str | None = None,
    root: Path | None = RESULTS,
    command: str | None = None,
) -> list[ZooResult]:
    """Sweep the architectures matching ``patterns`` (all by default); record them as run ``out`` of the study
    under ``root`` (``None``: write nothing). ``out`` defaults to ``zoo`` for the whole zoo, ``sample`` otherwise."""
    import timm

    names = timm.list_models()
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    start = time.perf_counter()
    results = []
    for i, name in enumerate(names):
        result = check_meta(name)
        if real_max_params and result.status == "supported" and _num_params(name) <= real_max_params:
            try:
                result.real_check = check_real(name)
            except Exception as err:  # recorded; the model itself may not run on the CPU
                result.real_check = f"not run: {type(err).__name__}: {err}"[:200]
        results.append(result)
        if result.status == "failed" or (i + 1) % 100 == 0:
            print(f"[{i + 1}/{len(names)}] {name}: {result.status} {result.reason}", flush=True)
    seconds = time.perf_counter() - start
    summary = summarise(results, seconds)
    if root is not None:
        name = out or ("sample" if patterns else "zoo")
        numbers = {"seconds": seconds, "models": [asdict(r) for r in results]}
        record(STUDY, name, numbers, summary, command or command_line("benchmarks.studies.zoo"), root=root)
    print(summary)
    return results


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.zoo") -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=__doc__.split("\n")[0])
    parser.add_argument("patterns", nargs="*", help="fnmatch patterns of architecture names (default: all)")
    parser.add_argument(
        "--real-max-params",
        type=float,
        default=0,
        help="also check old logits with real weights for models up to this many parameters",
    )
    parser.add_argument("--out", default=None, help="run name in benchmarks/results/zoo (default: zoo, or sample)")
    parser.add_argument("--no-write", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    root = None if args.no_write else RESULTS
    results = run(args.patterns or None, int(args.real_max_params), args.out, root, command_line(prog, argv))
    raise SystemExit(1 if any(r.status == "failed" for r in results) else 0)


if __name__ == "__main__":
    main()
