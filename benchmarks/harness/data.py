"""Benchmark data: real ImageNet heads, their features on one photo per class, and the folds.

Photos: ``../shared/data/imagenet-sample-images`` (file i in sorted order is class i; checked against
timm's ImageNet-1k label order). Features are what the classifier layer sees (captured with a forward
pre-hook), cached per model in ``benchmarks/.cache/`` (outside git).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CLASSIFIER_INJECTION_SHARED", ROOT.parent / "shared"))
PHOTOS = SHARED / "data" / "imagenet-sample-images"
EMBEDDINGS = SHARED / "data" / "class-embeddings"
CACHE = ROOT / "benchmarks" / ".cache"
RESULTS = ROOT / "benchmarks" / "results"
#: How :attr:`HeadData.feature_mean` was estimated (recorded in the calibrations' diagnostics).
FEATURE_SOURCE = "benchmarks.harness.data.estimated_feature_statistics"
MODELS = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")


def shared_data_available() -> bool:
    return PHOTOS.is_dir() and len(list(PHOTOS.glob("*.JPEG"))) == 1000


def photo_paths() -> list[Path]:
    """The 1000 photos in ImageNet-1k class order (verified against timm's WordNet ids)."""
    from timm.data import ImageNetInfo

    paths = sorted(PHOTOS.glob("*.JPEG"))
    wnids = ImageNetInfo("imagenet-1k").label_names()
    if len(paths) != len(wnids) or any(not p.name.startswith(w + "_") for p, w in zip(paths, wnids, strict=True)):
        raise RuntimeError(f"{PHOTOS} does not hold one photo per ImageNet-1k class in timm's order")
    return paths


def fold_classes(k: int, num_classes: int = 1000, num_folds: int = 5) -> np.ndarray:
    """Held-out classes of fold ``k``: ``sorted(perm[200k:200(k+1)])`` with ``RandomState(0)``."""
    perm = np.random.RandomState(0).permutation(num_classes)
    size = num_classes // num_folds
    return np.sort(perm[size * k : size * (k + 1)])


@dataclass
class HeadData:
    """One real model: its head rows, and the features/labels of one photo per class."""

    model_name: str
    rows: torch.Tensor  # [1000, D + 1] = [W | b]
    features: torch.Tensor  # [1000, D], input of the classifier layer for photo i
    labels: torch.Tensor  # [1000], photo i is of class i
    feature_mean: torch.Tensor | None = None  # image-free estimate from the model (classifier_injection.features)
    feature_std: torch.Tensor | None = None  # image-free spread estimate, same source

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        return self.features @ rows[:, :-1].T + rows[:, -1]

    def statistics(self):
        """The image-free feature statistics as the library's calibration gets them, or ``None``."""
        from classifier_injection.features import FeatureStatistics

        if self.feature_mean is None:
            return None
        return FeatureStatistics(self.feature_mean, FEATURE_SOURCE, self.feature_std)

    def restricted(self, classes: torch.Tensor) -> HeadData:
        """The head restricted to ``classes`` (their rows and photos, relabelled ``0..len(classes) - 1``)."""
        return HeadData(
            self.model_name,
            self.rows[classes],
            self.features[classes],
            torch.arange(len(classes)),
            self.feature_mean,
            self.feature_std,
        )


def load_model(model_name: str) -> torch.nn.Module:
    from classifier_injection.offline import efficientnet_lite

    if not model_name.startswith("tf_efficientnet_lite"):
        raise ValueError(f"no offline weights for {model_name}")
    return efficientnet_lite(int(model_name[-1]))


@functools.cache
def estimated_feature_statistics(model_name: str):
    """The library's image-free feature statistics (what ``inject()`` gives the calibration), or ``None``."""
    from classifier_injection.features import feature_statistics
    from classifier_injection.heads import find_head

    model = load_model(model_name)
    return feature_statistics(model, find_head(model))


def estimated_feature_mean(model_name: str) -> torch.Tensor | None:
    """The library's image-free estimate of the mean feature."""
    stats = estimated_feature_statistics(model_name)
    return stats.mean if stats is not None else None


def _with_statistics(model_name: str, rows: torch.Tensor, features: torch.Tensor, labels: torch.Tensor) -> HeadData:
    stats = estimated_feature_statistics(model_name)
    if stats is None:
        return HeadData(model_name, rows, features, labels)
    return HeadData(model_name, rows, features, labels, stats.mean, stats.std)


@torch.no_grad()
def head_data(model_name: str, batch_size: int = 50, image_size: int | None = None) -> HeadData:
    """Head rows and photo features of ``model_name``, extracted once and cached.

    ``image_size``: photos resized to this many pixels instead of the model's own test size (a shift of the
    photos' distribution the head never sees; ``benchmarks.studies.calibration_shift``).
    """
    from safetensors.torch import load_file

    from classifier_injection.serialization import atomic_save_safetensors

    suffix = "" if image_size is None else f"@{image_size}px"
    cache = CACHE / f"{model_name}{suffix}.safetensors"
    if cache.is_file():
        t = load_file(str(cache))
        return _with_statistics(model_name, t["rows"], t["features"], t["labels"])

    import timm
    from PIL import Image

    from classifier_injection.heads import find_head

    model = load_model(model_name)
    head = find_head(model)
    overrides = {} if image_size is None else {"input_size": (3, image_size, image_size)}
    transform = timm.data.create_transform(**timm.data.resolve_data_config(overrides, model=model))
    captured: list[torch.Tensor] = []
    hook = head.layer(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0].flatten(1)))
    paths = photo_paths()
    try:
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]])
            model(batch)
    finally:
        hook.remove()
    rows, features = head.rows(model), torch.cat(captured).float()
    data = _with_statistics(model_name, rows, features, torch.arange(len(paths)))
    CACHE.mkdir(parents=True, exist_ok=True)
    tensors = {"rows": data.rows, "features": data.features, "labels": data.labels}
    atomic_save_safetensors(tensors, cache, overwrite=True)  # a run stopped mid-write leaves no broken cache
    return data


if __name__ == "__main__":
    for name in MODELS:
        d = head_data(name)
        acc = (d.logits(d.rows).argmax(1) == d.labels).float().mean().item()
        print(f"{name}: rows {tuple(d.rows.shape)}, features {tuple(d.features.shape)}, top-1 {100 * acc:.1f}%")
