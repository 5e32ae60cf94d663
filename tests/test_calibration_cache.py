"""The on-disk caches of calibration choices and of fitted rows: reused exactly for the same inputs only."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch

import classifier_injection.calibration as calibration
from classifier_injection import ICISConfig, ICISInjector, InjectionConfig, find_head, inject
from classifier_injection.cache import source_digest
from classifier_injection.calibration import FactorChoice, simulation
from classifier_injection.calibration import cache as calibration_cache

NAMES = [f"class {i}" for i in range(12)]


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    # Has a BatchNorm before the pool, so the default rule (synthesize) runs rather than its fallback.
    torch.manual_seed(0)
    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=12).eval()


@pytest.fixture
def simulations(monkeypatch) -> list[int]:
    """Counts the simulated injections (the expensive step the cache skips)."""
    calls: list[int] = []
    original = simulation._simulate_injections

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(simulation, "_simulate_injections", counting)
    return calls


def _inject(model, names, embedder, cache, class_names=NAMES, calibration=None, **kwargs):
    icis = None if "injector" in kwargs else ICISConfig(latent_dim=16, max_epochs=3)
    config = InjectionConfig(icis=icis, calibration=calibration)
    return inject(model, names, config, embedder=embedder, class_names=class_names, cache=cache, **kwargs)


def _new_rows(model) -> torch.Tensor:
    return find_head(model).rows(model)[12:]


def test_second_injection_into_the_same_head_reuses_the_choice_exactly(lite0, embedder, tmp_path, simulations):
    first = _inject(lite0, ["capybara"], embedder, tmp_path)
    assert len(simulations) == 1
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1, "one choice stored, as JSON"
    assert json.loads(files[0].read_text())["name"] == "synthesize"

    cached = _inject(lite0, ["red panda", "okapi"], embedder, tmp_path)
    assert len(simulations) == 1, "the second injection skipped the simulation"
    fresh = _inject(lite0, ["red panda", "okapi"], embedder, False)
    assert len(simulations) == 2
    torch.testing.assert_close(_new_rows(cached), _new_rows(fresh), rtol=0, atol=0)
    record = cached.classifier_injection["injections"][-1]["calibration"]
    assert record == fresh.classifier_injection["injections"][-1]["calibration"]
    assert record["factor"] == first.classifier_injection["injections"][-1]["calibration"]["factor"]
    assert len(record["biases"]) == 2, "per-row biases are computed for the new rows, not cached"


def test_a_trained_injector_reused_for_the_same_head_also_reuses_the_choice(lite0, embedder, tmp_path, simulations):
    trained = ICISInjector(ICISConfig(latent_dim=16, max_epochs=3))
    first = _inject(lite0, ["capybara"], embedder, tmp_path, injector=trained)
    assert trained.is_fitted and len(simulations) == 1
    batch = _inject(lite0, ["okapi"], embedder, tmp_path, injector=trained)
    assert len(simulations) == 1, "no refit and no simulation: the batch path"
    factor = first.classifier_injection["injections"][-1]["calibration"]["factor"]
    assert batch.classifier_injection["injections"][-1]["calibration"]["factor"] == factor


def test_another_seed_rule_or_head_is_not_served_from_the_cache(lite0, embedder, tmp_path, simulations):
    _inject(lite0, ["capybara"], embedder, tmp_path)
    _inject(lite0, ["capybara"], embedder, tmp_path, seed=1)
    _inject(
        lite0,
        ["capybara"],
        embedder,
        tmp_path,
        calibration=calibration.SynthesizedCalibration(offset=0.5),
    )
    other_head = _inject(lite0, ["capybara"], embedder, tmp_path)  # a grown head (13 classes) is another head
    _inject(other_head, ["okapi"], embedder, tmp_path, class_names=None)
    assert len(simulations) == 4
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 4


def test_damaged_or_foreign_cache_files_are_ignored_and_rewritten(lite0, embedder, tmp_path, simulations, caplog):
    reference = _inject(lite0, ["capybara"], embedder, tmp_path)
    (path,) = (tmp_path / "calibration").glob("*.json")
    for damage in ("{not json", json.dumps({"name": "synthesize"}), "[]"):
        path.write_text(damage)
        with caplog.at_level(logging.WARNING, logger="classifier_injection.calibration.cache"):
            again = _inject(lite0, ["capybara"], embedder, tmp_path)
        assert "ignoring unreadable calibration cache" in caplog.text
        caplog.clear()
        torch.testing.assert_close(_new_rows(again), _new_rows(reference), rtol=0, atol=0)
        assert FactorChoice.from_dict(json.loads(path.read_text())).name == "synthesize", "rewritten"
    assert len(simulations) == 4


def test_only_injectors_that_declare_a_reproducible_fit_are_cached(lite0, embedder, tmp_path, simulations):
    class OwnICIS(ICISInjector):
        cacheable = False  # e.g. a user's subclass whose fit depends on more than hparams()

    config = ICISConfig(latent_dim=16, max_epochs=3)
    for _ in range(2):
        _inject(lite0, ["capybara"], embedder, tmp_path, injector=OwnICIS(config))
    assert len(simulations) == 2
    assert not (tmp_path / "calibration").exists()
    _inject(lite0, ["capybara"], embedder, False)
    assert not (tmp_path / "calibration").exists(), "embedding_cache=False writes nothing"


@pytest.mark.parametrize(
    "data",
    [
        [],
        {"name": "synthesize", "factor": 1.0, "bias_rule": "feature-mean", "offset": 1.0},
        {"name": "s", "factor": -1.0, "bias_rule": "feature-mean", "offset": 1.0, "diagnostics": {}},
        {"name": "s", "factor": 1.0, "bias_rule": "median", "offset": 1.0, "diagnostics": {}},
        {"name": "s", "factor": 1.0, "bias_rule": "mean", "offset": float("nan"), "diagnostics": {}},
        {"name": "s", "factor": 1.0, "bias_rule": "mean", "offset": 0.0, "diagnostics": {}, "extra": 1},
    ],
)
def test_factor_choice_from_dict_rejects_anything_else(data):
    with pytest.raises(ValueError):
        FactorChoice.from_dict(data)
    choice = FactorChoice("synthesize", 1.1, "feature-mean", 1.0, {"simulated_S": 90.0})
    assert FactorChoice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice


def test_the_key_follows_the_code_of_the_injector_class(tmp_path, monkeypatch):
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    source = tmp_path / "own_injector.py"
    source.write_text("from classifier_injection import ICISInjector\n\nclass Own(ICISInjector):\n    pass\n")
    own = importlib.import_module("own_injector").Own
    modules = calibration_cache._SIMULATION_MODULES
    before = source_digest(modules, own)
    assert before is not None and before != source_digest(modules, ICISInjector)
    source.write_text(source.read_text() + "\n# the fit changed\n")
    source_digest.cache_clear()
    assert source_digest(modules, own) != before, "editing the injector's module changes the key"
    source.unlink()
    source_digest.cache_clear()
    assert source_digest(modules, own) is None, "no readable source: no caching"


def test_a_cache_folder_that_cannot_be_written_only_warns(lite0, tmp_path, caplog):
    from tests.conftest import FakeEmbedder

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    embedder = FakeEmbedder(8, cacheable=True)  # cacheable: its vectors would be written too
    with caplog.at_level(logging.WARNING, logger="classifier_injection"):
        model = _inject(lite0, ["capybara"], embedder, blocked)
    assert model.num_classes == 13
    assert "could not write the embedding cache" in caplog.text
    assert "could not write the calibration cache" in caplog.text
    assert "could not write the row cache" in caplog.text
    assert blocked.read_text() == "a file where the cache folder should be"


@pytest.fixture
def fits(monkeypatch) -> list[int]:
    """Counts ICIS fits (the step the row cache skips)."""
    calls: list[int] = []
    original = ICISInjector.fit

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ICISInjector, "fit", counting)
    return calls


def test_the_same_injection_again_skips_the_fit_and_gives_the_same_model(lite0, embedder, tmp_path, fits):
    first = _inject(lite0, ["capybara", "okapi"], embedder, tmp_path)
    assert len(fits) == 2, "the injection's fit and the calibration's simulated one"
    (path,) = (tmp_path / "rows").glob("*.safetensors")
    again = _inject(lite0, ["capybara", "okapi"], embedder, tmp_path)
    assert len(fits) == 2, "neither fit ran again"
    fresh = _inject(lite0, ["capybara", "okapi"], embedder, False)
    for model in (again, fresh):
        torch.testing.assert_close(_new_rows(model), _new_rows(first), rtol=0, atol=0)
        record, reference = model.classifier_injection["injections"][-1], first.classifier_injection["injections"][-1]
        assert record["hparams"] == reference["hparams"] and record["hparams"]["epochs_trained"] == 3
    assert list((tmp_path / "rows").glob("*.safetensors")) == [path]


@pytest.mark.parametrize(
    "change",
    [{"names": ["capybara", "tapir"]}, {"seed": 1}, {"icis": ICISConfig(latent_dim=16, max_epochs=4)}],
    ids=["names", "seed", "settings"],
)
def test_other_names_seed_or_settings_fit_again(lite0, embedder, tmp_path, fits, change):
    _inject(lite0, ["capybara", "okapi"], embedder, tmp_path)
    fitted = len(fits)
    config = InjectionConfig(icis=change.get("icis", ICISConfig(latent_dim=16, max_epochs=3)))
    names = change.get("names", ["capybara", "okapi"])
    inject(lite0, names, config, embedder=embedder, class_names=NAMES, cache=tmp_path, seed=change.get("seed", 0))
    assert len(fits) > fitted
    assert len(list((tmp_path / "rows").glob("*.safetensors"))) == 2


def test_an_injector_the_caller_passes_is_always_fitted(lite0, embedder, tmp_path):
    config = ICISConfig(latent_dim=16, max_epochs=3)
    for _ in range(2):
        injector = ICISInjector(config)
        _inject(lite0, ["capybara"], embedder, tmp_path, injector=injector)
        assert injector.is_fitted, "the caller's injector comes back trained"
    assert not (tmp_path / "rows").exists()


def test_damaged_row_files_are_ignored_and_rewritten(lite0, embedder, tmp_path, fits, caplog):
    from safetensors.torch import save_file

    reference = _inject(lite0, ["capybara"], embedder, tmp_path)
    (path,) = (tmp_path / "rows").glob("*.safetensors")
    damages = [
        lambda: path.write_bytes(b"not a safetensors file"),
        lambda: save_file({"rows": torch.zeros(1, 1281)}, str(path)),  # no hparams
        lambda: save_file({"rows": torch.zeros(2, 1281)}, str(path), metadata={"hparams": "{}"}),  # one row too many
        lambda: save_file({"rows": torch.zeros(4)}, str(path), metadata={"hparams": "{}"}),
        lambda: save_file({"rows": torch.zeros(1, 1281)}, str(path), metadata={"hparams": "[]"}),
    ]
    for damage in damages:
        damage()
        with caplog.at_level(logging.WARNING, logger="classifier_injection.cache"):
            again = _inject(lite0, ["capybara"], embedder, tmp_path)
        assert "ignoring unreadable row cache" in caplog.text
        caplog.clear()
        torch.testing.assert_close(_new_rows(again), _new_rows(reference), rtol=0, atol=0)
    assert len(fits) == 2 + len(damages), "each damaged file cost one fit (the calibration's choice stayed cached)"
    again = _inject(lite0, ["capybara"], embedder, tmp_path)
    assert len(fits) == 2 + len(damages), "rewritten: served again"
