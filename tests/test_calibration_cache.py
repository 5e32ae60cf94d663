"""The on-disk caches of calibration choices and of fits: reused exactly for the same inputs only."""

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
from classifier_injection.serialization import read_safetensors

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


def _inject(model, names, embedder, cache, class_names=NAMES, calibration=None, new_descriptors=None, **kwargs):
    icis = None
    if "injector" not in kwargs:
        icis = ICISConfig(latent_dim=16, max_epochs=3)
        if new_descriptors is not None:
            icis = ICISConfig(latent_dim=16, max_epochs=3, include_new_descriptors=new_descriptors)
    config = InjectionConfig(icis=icis, calibration=calibration)
    return inject(model, names, config, embedder=embedder, class_names=class_names, cache=cache, **kwargs)


def _new_rows(model) -> torch.Tensor:
    return find_head(model).rows(model)[12:]


def test_a_repeated_injection_reuses_the_choice_exactly(lite0, embedder, tmp_path, simulations):
    first = _inject(lite0, ["red panda", "okapi"], embedder, tmp_path)
    assert len(simulations) == 1
    files = list((tmp_path / "calibration").glob("*.json"))
    assert len(files) == 1, "one choice stored, as JSON"
    assert json.loads(files[0].read_text())["name"] == "synthesize"

    cached = _inject(lite0, ["red panda", "okapi"], embedder, tmp_path)
    assert len(simulations) == 1, "the second injection skipped the simulation"
    fresh = _inject(lite0, ["red panda", "okapi"], embedder, False)
    assert len(simulations) == 2
    for other in (cached, first):
        torch.testing.assert_close(_new_rows(other), _new_rows(fresh), rtol=0, atol=0)
    record = cached.classifier_injection["injections"][-1]["calibration"]
    assert record == fresh.classifier_injection["injections"][-1]["calibration"]
    assert record["diagnostics"]["simulation"] == "left-out", "the injection's own fit, not a second one"
    assert len(record["biases"]) == 2, "per-row biases are computed for the new rows, not cached"


def test_other_new_classes_are_simulated_with_their_own_fit(lite0, embedder, tmp_path, simulations):
    # The simulation reuses the injection's fit; one that saw the new classes' descriptors makes a choice for them.
    _inject(lite0, ["capybara"], embedder, tmp_path, new_descriptors=True)
    other = _inject(lite0, ["red panda", "okapi"], embedder, tmp_path, new_descriptors=True)
    assert len(simulations) == 2
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 2
    fresh = _inject(lite0, ["red panda", "okapi"], embedder, False, new_descriptors=True)
    torch.testing.assert_close(_new_rows(other), _new_rows(fresh), rtol=0, atol=0)


def test_other_new_classes_reuse_a_fit_that_never_read_them(lite0, embedder, tmp_path, simulations, fits):
    # A fit on the old classes alone is the head's: any new classes are predicted and calibrated from it.
    _inject(lite0, ["capybara"], embedder, tmp_path, new_descriptors=False)
    other = _inject(lite0, ["red panda", "okapi"], embedder, tmp_path, new_descriptors=False)
    assert len(fits) == 1 and len(simulations) == 1, "neither the fit nor the simulation ran again"
    assert len(list((tmp_path / "fits").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "calibration").glob("*.json"))) == 1
    fresh = _inject(lite0, ["red panda", "okapi"], embedder, False, new_descriptors=False)
    torch.testing.assert_close(_new_rows(other), _new_rows(fresh), rtol=0, atol=0)
    records = [m.classifier_injection["injections"][-1] for m in (other, fresh)]
    assert records[0]["calibration"] == records[1]["calibration"]
    assert records[0]["hparams"] == records[1]["hparams"]


def test_a_cached_fit_without_a_cached_choice_is_simulated_as_before(lite0, embedder, tmp_path, simulations, fits):
    # The fit is read from disk; the simulation runs on it, exactly as on the fresh fit.
    first = _inject(lite0, ["red panda", "okapi"], embedder, tmp_path)
    for path in (tmp_path / "calibration").glob("*.json"):
        path.unlink()
    again = _inject(lite0, ["red panda", "okapi"], embedder, tmp_path)
    assert len(simulations) == 2 and len(fits) == 1
    torch.testing.assert_close(_new_rows(again), _new_rows(first), rtol=0, atol=0)
    assert (
        again.classifier_injection["injections"][-1]["calibration"]
        == (first.classifier_injection["injections"][-1]["calibration"])
    )


def test_a_trained_injector_reused_for_the_same_head_simulates_with_its_own_fit(lite0, embedder, tmp_path, fits):
    trained = ICISInjector(ICISConfig(latent_dim=16, max_epochs=3))
    first = _inject(lite0, ["capybara"], embedder, tmp_path, injector=trained)
    assert trained.is_fitted and len(fits) == 1
    batch = _inject(lite0, ["okapi"], embedder, tmp_path, injector=trained)
    assert len(fits) == 1, "no refit: the batch path"
    records = [m.classifier_injection["injections"][-1]["calibration"] for m in (first, batch)]
    assert records[1]["factor"] == records[0]["factor"], "the same fit's simulation"
    assert records[1]["diagnostics"]["simulation"] == "left-out"
    grown = _inject(first, ["okapi"], embedder, tmp_path, injector=trained, class_names=None)
    assert len(fits) == 2, "on the grown head the simulation refits: the injector's blends lack the new row"
    assert grown.classifier_injection["injections"][-1]["calibration"]["diagnostics"]["simulation"] == "refit"


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
    assert "could not write the fit cache" in caplog.text
    assert blocked.read_text() == "a file where the cache folder should be"


@pytest.fixture
def fits(monkeypatch) -> list[int]:
    """Counts ICIS fits (the step the fit cache skips)."""
    calls: list[int] = []
    original = ICISInjector.fit

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ICISInjector, "fit", counting)
    return calls


def test_the_same_injection_again_skips_the_fit_and_gives_the_same_model(lite0, embedder, tmp_path, fits):
    first = _inject(lite0, ["capybara", "okapi"], embedder, tmp_path)
    assert len(fits) == 1, "one fit: the calibration's simulation reuses it"
    (path,) = (tmp_path / "fits").glob("*.safetensors")
    assert not {"weight_ae.decoder.basis", "basis_keys"} & set(read_safetensors(path)[0]), "the head is not stored"
    again = _inject(lite0, ["capybara", "okapi"], embedder, tmp_path)
    assert len(fits) == 1, "the fit did not run again"
    fresh = _inject(lite0, ["capybara", "okapi"], embedder, False)
    for model in (again, fresh):
        torch.testing.assert_close(_new_rows(model), _new_rows(first), rtol=0, atol=0)
        record, reference = model.classifier_injection["injections"][-1], first.classifier_injection["injections"][-1]
        assert record["hparams"] == reference["hparams"] and record["hparams"]["epochs_trained"] == 3
    assert list((tmp_path / "fits").glob("*.safetensors")) == [path]


@pytest.mark.parametrize(
    "change",
    [
        {"names": ["capybara", "tapir"], "reads_names": True},
        {"seed": 1},
        {"icis": ICISConfig(latent_dim=16, max_epochs=4)},
    ],
    ids=["names-read-by-the-fit", "seed", "settings"],
)
def test_other_names_seed_or_settings_fit_again(lite0, embedder, tmp_path, fits, change):
    base = ICISConfig(latent_dim=16, max_epochs=3, include_new_descriptors=change.get("reads_names", False))
    first = InjectionConfig(icis=base)
    inject(lite0, ["capybara", "okapi"], first, embedder=embedder, class_names=NAMES, cache=tmp_path)
    fitted = len(fits)
    config = InjectionConfig(icis=change.get("icis", base))
    names = change.get("names", ["capybara", "okapi"])
    inject(lite0, names, config, embedder=embedder, class_names=NAMES, cache=tmp_path, seed=change.get("seed", 0))
    assert len(fits) > fitted
    assert len(list((tmp_path / "fits").glob("*.safetensors"))) == 2


def test_an_injector_the_caller_passes_is_always_fitted(lite0, embedder, tmp_path):
    config = ICISConfig(latent_dim=16, max_epochs=3)
    for _ in range(2):
        injector = ICISInjector(config)
        _inject(lite0, ["capybara"], embedder, tmp_path, injector=injector)
        assert injector.is_fitted, "the caller's injector comes back trained"
    assert not (tmp_path / "fits").exists()


def test_damaged_fit_files_are_ignored_and_rewritten(lite0, embedder, tmp_path, fits, caplog):
    from safetensors.torch import save_file

    reference = _inject(lite0, ["capybara"], embedder, tmp_path)
    (path,) = (tmp_path / "fits").glob("*.safetensors")
    stored, metadata = read_safetensors(path)
    tensors = {k: v.clone() for k, v in stored.items()}  # not views of the file the damages overwrite
    del stored
    first = next(iter(tensors))
    damages = [
        lambda: path.write_bytes(b"not a safetensors file"),
        lambda: save_file(tensors, str(path)),  # no metadata
        lambda: save_file({k: v for k, v in tensors.items() if k != first}, str(path), metadata=metadata),
        lambda: save_file({**tensors, first: tensors[first] * float("nan")}, str(path), metadata=metadata),
        lambda: save_file(tensors, str(path), metadata={**metadata, "seed": "1"}),  # another fit's
        lambda: save_file(tensors, str(path), metadata={**metadata, "basis_rows": "11"}),
        lambda: save_file(tensors, str(path), metadata={**metadata, "config": "[]"}),
    ]
    for damage in damages:
        damage()
        with caplog.at_level(logging.WARNING, logger="classifier_injection.cache"):
            again = _inject(lite0, ["capybara"], embedder, tmp_path)
        assert "ignoring unreadable fit cache" in caplog.text
        caplog.clear()
        torch.testing.assert_close(_new_rows(again), _new_rows(reference), rtol=0, atol=0)
    assert len(fits) == 1 + len(damages), "each damaged file cost one fit (the calibration's choice stayed cached)"
    again = _inject(lite0, ["capybara"], embedder, tmp_path)
    assert len(fits) == 1 + len(damages), "rewritten: served again"


def test_an_injector_whose_rows_cannot_be_left_out_is_refitted_for_the_simulation(lite0, embedder, fits):
    config = InjectionConfig(icis=ICISConfig(latent_dim=16, max_epochs=3, row_decoder="linear", dropout=0.0))
    out = inject(lite0, ["capybara"], config, embedder=embedder, class_names=NAMES, cache=False)
    assert len(fits) == 2, "the injection's fit and the simulation's refit on the kept classes"
    assert out.classifier_injection["injections"][-1]["calibration"]["diagnostics"]["simulation"] == "refit"
