"""Property tests (hypothesis) over head sizes, dtypes, architectures and class lists.

For every generated case: old logits are bit-identical, the output is N + K wide, a save/load round trip
is exact (logits, dtype, names), the same seed gives the same rows, and a rejected call changes nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from classifier_injection import ICISConfig, InjectionConfig, inject, load_injected, save_injected
from tests.conftest import FakeEmbedder

ARCHITECTURES = ("test_resnet", "test_efficientnet", "test_vit")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FAST = ICISConfig(latent_dim=8, max_epochs=1)
CONFIG = InjectionConfig(icis=FAST, calibration="norm")
EMBEDDER = FakeEmbedder(8, default_template="{name}")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _key(name: str) -> str:
    return " ".join(name.split()).casefold()


def _seen(n: int) -> list[str]:
    return [f"old class {i}" for i in range(n)]


names_strategy = st.lists(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=24).filter(
        lambda s: s.strip() and not _key(s).startswith("old class")
    ),
    min_size=1,
    max_size=6,
    unique_by=_key,
)


def _model(architecture: str, num_classes: int, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, num_classes=num_classes).eval().to(dtype)
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": _seen(num_classes)}
    return model


def _images(model: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
    size = model.pretrained_cfg.get("input_size", (3, 64, 64))
    return torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(dtype)


def _inject(model, names, seed=0):
    # No on-disk cache: every call fits and calibrates anew, so repeated calls test determinism, not the cache.
    return inject(model, names, CONFIG, embedder=EMBEDDER, seed=seed, cache=False)


@SETTINGS
@given(
    architecture=st.sampled_from(ARCHITECTURES),
    num_classes=st.integers(2, 40),
    dtype=st.sampled_from(DTYPES),
    names=names_strategy,
    seed=st.integers(0, 2**16),
)
def test_old_logits_width_names_and_round_trip(architecture, num_classes, dtype, names, seed):
    model = _model(architecture, num_classes, dtype, seed)
    images = _images(model, dtype)
    with torch.no_grad():
        before = model(images)
    out = _inject(model, names, seed=seed)
    with torch.no_grad():
        after = out(images)
    assert after.shape == (2, num_classes + len(names)) and after.dtype == dtype
    assert torch.equal(after[:, :num_classes], before)  # bit-identical old logits
    assert torch.isfinite(after).all()
    assert out.pretrained_cfg["label_names"] == _seen(num_classes) + names
    with torch.no_grad():
        assert torch.equal(model(images), before)  # the input model is untouched

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_injected(save_injected(out, Path(tmp) / "m"))
    with torch.no_grad():
        assert torch.equal(loaded(images), after)  # exact round trip
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert loaded.pretrained_cfg["label_names"] == _seen(num_classes) + names


@SETTINGS
@given(
    architecture=st.sampled_from(ARCHITECTURES),
    num_classes=st.integers(2, 40),
    dtype=st.sampled_from(DTYPES),
    names=names_strategy,
    seed=st.integers(0, 2**16),
)
def test_same_seed_same_model(architecture, num_classes, dtype, names, seed):
    model = _model(architecture, num_classes, dtype, 0)
    first, second = _inject(model, names, seed=seed), _inject(model, names, seed=seed)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@SETTINGS
@given(
    num_classes=st.integers(2, 40),
    names=names_strategy,
    data=st.data(),
)
def test_rejected_calls_change_nothing(num_classes, names, data):
    """A list with a repeated name (up to case and spacing) is refused, even with inplace=True."""
    model = _model("test_resnet", num_classes, torch.float32, 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    repeated = data.draw(st.sampled_from(names))
    variant = data.draw(st.sampled_from([repeated, repeated.upper(), f"  {repeated} "]))
    if _key(variant) != _key(repeated):  # e.g. upper() of some scripts changes more than case
        variant = repeated
    bad = [*names, variant]
    with pytest.raises(ValueError, match="duplicates"):
        inject(model, bad, CONFIG, embedder=EMBEDDER, inplace=True)
    assert model.num_classes == num_classes
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.pretrained_cfg["label_names"] == _seen(num_classes)
