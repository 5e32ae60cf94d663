"""Shared fixtures: tiny timm models and the one fake embedder, so unit tests run in seconds."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import timm
import torch
import torch.nn.functional as F

from classifier_injection import ICISConfig


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # inject() caches embeddings and calibration choices on disk: the suite uses its own folder, never the user's.
    previous = os.environ.get("CLASSIFIER_INJECTION_CACHE")
    os.environ["CLASSIFIER_INJECTION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("CLASSIFIER_INJECTION_CACHE", None)
    else:
        os.environ["CLASSIFIER_INJECTION_CACHE"] = previous


#: Torch's intra-op threads before the suite takes them to one.
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # The test models are tiny: intra-op threads only add overhead, and on a shared 2-core machine contention.
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="module")
def all_threads():
    """Every thread torch had, for a module of real-size models (an ICIS fit on a 1000-class head is matrix-bound)."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(1)


class FakeEmbedder:
    """Deterministic text -> vector map (a hash seeds a Gaussian), recording what it encodes: no model needed."""

    def __init__(self, dim: int = 16, *, cacheable: bool = False, default_template: str | None = None) -> None:
        self._dim = dim
        self.cacheable = cacheable
        self.default_template = default_template
        self.calls: list[list[str]] = []

    @property
    def id(self) -> str:
        return f"fake-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
            rows.append(torch.randn(self._dim, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)


def synthetic_head(num: int = 40, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic head whose rows are a linear function of the class descriptors (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    descriptors = F.normalize(torch.randn(num, 8, generator=g), dim=1)
    mixing = torch.randn(8, dim + 1, generator=g)
    rows = descriptors @ mixing + 0.3 * torch.randn(num, dim + 1, generator=g)
    rows[:, -1] = 0.05 * torch.randn(num, generator=g)
    return descriptors, rows


class LeastSquares:
    """A tiny ridge injector: enough to give the simulation real (imperfect) predictions."""

    name = "lsq"

    def __init__(self, shrink: float = 1.0) -> None:
        self.shrink = shrink

    def fit(self, seen_descriptors, seen_rows, new_descriptors=None):
        a = seen_descriptors
        self.map = torch.linalg.solve(a.T @ a + 0.1 * torch.eye(a.shape[1]), a.T @ seen_rows)
        return self

    def predict(self, descriptors):
        return self.shrink * descriptors @ self.map

    def hparams(self):
        return {"shrink": self.shrink}


@pytest.fixture
def embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
def fast_icis() -> ICISConfig:
    return ICISConfig(latent_dim=32, max_epochs=5, batch_size=8)


def tiny_model(name: str = "resnet18", num_classes: int = 10) -> torch.nn.Module:
    """A small randomly initialised timm classifier with readable class names in its pretrained_cfg."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": [f"class {i}" for i in range(num_classes)]}
    return model


@pytest.fixture
def resnet() -> torch.nn.Module:
    return tiny_model("resnet18")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module
