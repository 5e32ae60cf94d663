from __future__ import annotations

import warnings

import pytest
import timm
import torch

from classifier_injection import ICISInjector, InjectionConfig, find_head, inject, load_injected, save_injected
from classifier_injection.heads import SegmentedLinear
from tests.conftest import tiny_model

NEW = ["capybara", "red panda"]


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_inject_extends_head_and_keeps_old_logits(resnet, embedder, fast_icis):
    x = torch.randn(2, 3, 64, 64)
    before = _logits(resnet, x)
    state = {k: v.clone() for k, v in resnet.state_dict().items()}
    out = inject(resnet, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis))

    assert out is not resnet
    assert out.num_classes == 12 and out.pretrained_cfg["num_classes"] == 12
    assert out.pretrained_cfg["label_names"] == [f"class {i}" for i in range(10)] + NEW
    after = _logits(out, x)
    assert after.shape == (2, 12)
    assert torch.equal(after[:, :10], before)
    # the input model is untouched
    assert resnet.num_classes == 10 and len(resnet.pretrained_cfg["label_names"]) == 10
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in state.items())
    shared = {t.data_ptr() for t in out.state_dict().values()} & {t.data_ptr() for t in resnet.state_dict().values()}
    assert not shared, "the extended model shares no tensor with the input model"
    # head rows 0..N-1 are the old rows, in timm's layout
    assert isinstance(out.fc, SegmentedLinear) and out.fc.segments == (10, 2)
    assert torch.equal(out.fc.weight[:10], resnet.fc.weight)
    record = out.classifier_injection["injections"][0]
    assert record["names"] == NEW and record["method"] == "icis" and record["embedder"] == embedder.id


def test_inject_records_each_new_class_reliability(embedder, fast_icis):
    model = tiny_model("test_efficientnet", num_classes=12)  # BatchNorm-fed head: the feature statistics are known
    out = inject(model, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis))
    record = out.classifier_injection["injections"][0]
    assert record["calibration"]["name"] == "synthesize" and list(record["reliability"]) == NEW
    old_names = model.pretrained_cfg["label_names"]
    for entry in record["reliability"].values():
        assert len(entry["nearest"]) == 3 and all(name in old_names for name, _ in entry["nearest"])
        assert {"expected_precision", "expected_recall"} <= set(entry)  # the default calibration simulates
    scaled = inject(model, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis, new_class_scale=2.0))
    entry = scaled.classifier_injection["injections"][0]["reliability"]["capybara"]
    assert "expected_precision" not in entry and len(entry["nearest"]) == 3  # the rates hold at scale 1 only


def test_without_feature_statistics_only_the_nearest_old_classes_are_recorded(resnet, embedder, fast_icis):
    # resnet's head reads a residual sum: the default rule falls back to "simulate", whose rates (scored on the
    # rows' own directions) would be far above what photos give, so none are recorded and no class is warned about.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="least reliable")
        out = inject(resnet, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis))
    record = out.classifier_injection["injections"][0]
    assert record["calibration"]["name"] == "simulate" and record["expected"] is None
    assert "reliability" not in record["calibration"]["diagnostics"]
    for entry in record["reliability"].values():
        assert set(entry) == {"nearest"} and len(entry["nearest"]) == 3


def test_the_least_reliable_new_classes_get_a_warning_that_suggests_descriptions(monkeypatch):
    from classifier_injection import api

    seen = torch.eye(4, 5)  # four old rows along the axes, bias 0
    new = torch.tensor([[1.0, 0.1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5, 0]])  # next to "a", and between all four
    table = {"statistic": "nearest_cosine", "edges": [0.9], "recall": [40.0, 60.0], "precision": [80.0, 30.0]}
    with pytest.warns(UserWarning, match=r"least reliable new classes: 'x' \(near 'a'\).* 30 %.*descriptions="):
        record = api._reliability(new, table, seen, ["a", "b", "c", "d"], ["x", "y"], [True, True])
    assert record["x"]["expected_precision"] == 30.0 and record["y"]["expected_precision"] == 80.0
    single = {**table, "edges": [], "recall": [50.0], "precision": [50.0]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one bin: nothing to rank, no warning
        api._reliability(new, single, seen, ["a", "b", "c", "d"], ["x", "y"], [True, True])
        # Classes the ranking was not checked for (too few new classes, or no description) are not named.
        unranked = api._reliability(new, table, seen, ["a", "b", "c", "d"], ["x", "y"], [False, True])
    assert unranked["x"]["expected_precision"] == 30.0  # the record keeps its rates all the same


def test_only_injections_of_enough_described_classes_name_their_least_reliable(embedder, fast_icis, monkeypatch):
    from classifier_injection import api

    named: list[list[bool]] = []
    real = api._reliability
    monkeypatch.setattr(api, "_reliability", lambda *args: named.append(list(args[-1])) or real(*args))
    model = tiny_model("test_efficientnet", num_classes=12)
    config = InjectionConfig(icis=fast_icis, allow_existing=True)
    many = [f"new {i}" for i in range(api._RANKED_FROM)]
    described = {name: "a thing of some kind" for name in many[:-1]}
    inject(model, many, config, embedder=embedder, descriptions=described)
    inject(model, many[:2], config, embedder=embedder, descriptions={name: described[name] for name in many[:2]})
    assert named == [[True] * (len(many) - 1) + [False], [False, False]]


def test_inplace_modifies_and_returns_same_model(resnet, embedder, fast_icis):
    out = inject(resnet, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis), inplace=True)
    assert out is resnet and resnet.num_classes == 12


def test_inject_twice_keeps_all_earlier_logits(resnet, embedder, fast_icis):
    x = torch.randn(2, 3, 64, 64)
    once = inject(resnet, ["a"], embedder=embedder, config=InjectionConfig(icis=fast_icis))
    twice = inject(once, ["b", "c"], embedder=embedder, config=InjectionConfig(icis=fast_icis))
    assert twice.fc.segments == (10, 1, 2)
    assert torch.equal(_logits(twice, x)[:, :11], _logits(once, x))
    assert twice.pretrained_cfg["label_names"][-3:] == ["a", "b", "c"]
    assert len(twice.classifier_injection["injections"]) == 2


def test_deterministic_given_seed(resnet, embedder, fast_icis):
    # No cache: both calls fit (a cached fit would return the first call's rows).
    a = inject(resnet, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis), seed=1, cache=False)
    b = inject(resnet, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis), seed=1, cache=False)
    assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(a.fc.bias, b.fc.bias)


def test_conv1x1_head():
    model = tiny_model("dla34", num_classes=7)
    from tests.conftest import FakeEmbedder

    x = torch.randn(1, 3, 64, 64)
    before = _logits(model, x)
    out = inject(model, NEW, embedder=FakeEmbedder(), config=InjectionConfig(icis=fast_config()))
    assert find_head(out).family == "conv1x1"
    after = _logits(out, x)
    assert after.shape == (1, 9) and torch.equal(after[:, :7], before)


def fast_config():
    from classifier_injection import ICISConfig

    return ICISConfig(latent_dim=32, max_epochs=5, batch_size=8)


def test_save_load_round_trip_and_plain_timm_reload(tmp_path, resnet, embedder, fast_icis):
    x = torch.randn(2, 3, 64, 64)
    out = inject(resnet, NEW, embedder=embedder, config=InjectionConfig(icis=fast_icis))
    expected = _logits(out, x)
    path = save_injected(out, tmp_path / "model")
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()

    loaded = load_injected(path)
    assert torch.equal(_logits(loaded, x), expected)
    assert loaded.pretrained_cfg["label_names"][-2:] == NEW
    assert loaded.classifier_injection["injections"][0]["names"] == NEW

    plain = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    assert plain.num_classes == 12
    assert torch.allclose(_logits(plain, x), expected, atol=1e-5, rtol=0)
    assert plain.pretrained_cfg["label_names"][-2:] == NEW


def test_trained_injector_is_reused_without_refit(resnet, embedder, fast_icis):
    first = inject(resnet, ["a"], embedder=embedder, config=InjectionConfig(icis=fast_icis))
    injector = ICISInjector(fast_icis)
    inject(resnet, ["a"], embedder=embedder, injector=injector)
    history = list(injector.history)
    again = inject(resnet, ["a"], embedder=embedder, injector=injector)
    assert injector.history == history  # not refitted
    assert again.fc.weight.shape == first.fc.weight.shape


def test_config_is_serialisable_and_refuses_icis_settings_next_to_an_injector(resnet, embedder, fast_icis):
    import json

    import pytest

    from classifier_injection import DescriptorConfig
    from classifier_injection.calibration import SynthesizedCalibration

    config = InjectionConfig(
        descriptors=DescriptorConfig.from_preset("photo"),
        icis=fast_icis,
        calibration=SynthesizedCalibration(offset=0.5),
        new_class_scale=1.5,
    )
    assert InjectionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert InjectionConfig.from_dict(InjectionConfig(calibration="norm").to_dict()).calibration == "norm"
    with pytest.raises(ValueError, match="unknown InjectionConfig fields"):
        InjectionConfig.from_dict({"icis_config": {}})
    with pytest.raises(ValueError, match="unknown calibration"):
        InjectionConfig(calibration="nope")
    with pytest.raises(ValueError, match=r"config\.icis configures the default ICIS injector"):
        inject(resnet, NEW, InjectionConfig(icis=fast_icis), embedder=embedder, injector=ICISInjector(fast_icis))
    with pytest.raises(TypeError, match="config must be an InjectionConfig"):
        inject(resnet, NEW, {"calibration": "norm"}, embedder=embedder)
