"""inject() input validation: specific errors, and the input model is never changed by a failing call."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import timm
import torch
from torch import nn

from classifier_injection import ICISConfig, ICISInjector, InjectionConfig, UnsupportedHeadError, find_head, inject
from classifier_injection import api as api_module
from classifier_injection.api import MAX_NEW_CLASSES
from tests.conftest import FakeEmbedder

NAMES = [f"class {i}" for i in range(6)]
NEW = ["capybara", "red panda"]
FAST = ICISConfig(latent_dim=16, max_epochs=2)


def _model(num_classes: int = len(NAMES), dtype: torch.dtype = torch.float32) -> nn.Module:
    return timm.create_model("test_resnet", pretrained=False, num_classes=num_classes).eval().to(dtype)


def _snapshot(model: nn.Module) -> dict:
    """Everything a failing call must leave untouched: tensors, module types, metadata, mode."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "num_classes": model.num_classes,
        "pretrained_cfg": dict(model.pretrained_cfg),
        "default_cfg": dict(getattr(model, "default_cfg", {}) or {}),
        "training": model.training,
        "record": getattr(model, "classifier_injection", None),
    }


def _assert_unchanged(model: nn.Module, snapshot: dict) -> None:
    now = _snapshot(model)
    assert now["state"].keys() == snapshot["state"].keys()
    for key, value in snapshot["state"].items():
        assert torch.equal(now["state"][key], value), key
    for field in ("modules", "num_classes", "pretrained_cfg", "default_cfg", "training", "record"):
        assert now[field] == snapshot[field], field


def _inject(model: nn.Module, new, config: InjectionConfig | None = None, **kwargs) -> nn.Module:
    kwargs.setdefault("embedder", FakeEmbedder())
    kwargs.setdefault("class_names", NAMES)
    # Fast ICIS and a cheap, fit-free calibration: these tests are about validation.
    fast = {"icis": None if "injector" in kwargs else FAST, "calibration": "norm"}
    config = config or InjectionConfig()
    config = dataclasses.replace(config, **{k: v for k, v in fast.items() if getattr(config, k) is None})
    return inject(model, new, config, **kwargs)


# ---- names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "error", "match"),
    [
        ([], ValueError, "new_class_names is empty"),
        ("capybara", TypeError, "must be a list of strings"),
        ({"capybara", "okapi"}, TypeError, "must be a list of strings"),
        (None, TypeError, "must be a list of strings"),
        (["capybara", 3], TypeError, r"new_class_names\[1\] must be a string, got int"),
        (["capybara", b"okapi"], TypeError, r"new_class_names\[1\] must be a string, got bytes"),
        (["capybara", ""], ValueError, r"new_class_names\[1\] is empty or whitespace"),
        (["capybara", " \t\n"], ValueError, r"new_class_names\[1\] is empty or whitespace"),
        (["capybara", "okapi", "capybara"], ValueError, r"duplicates.*'capybara'"),
        (["Red Panda", "red  panda "], ValueError, r"duplicates.*'Red Panda'.*'red  panda '"),
        (["capybara", "Class 3"], ValueError, r"\['Class 3'\] already name classes.*allow_existing=True"),
    ],
    ids=[
        "empty",
        "bare-string",
        "set",
        "none",
        "int",
        "bytes",
        "empty-name",
        "whitespace",
        "duplicate",
        "duplicate-up-to-case-and-spaces",
        "existing",
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_bad_names_fail_before_anything_happens(names, error, match, inplace):
    model = _model()
    snapshot = _snapshot(model)
    embedder = FakeEmbedder()
    with pytest.raises(error, match=match):
        _inject(model, names, embedder=embedder, inplace=inplace)
    assert embedder.calls == []  # rejected before any embedding or training
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    ("descriptions", "error", "match"),
    [
        (["a large rodent"], TypeError, "descriptions must be a mapping"),
        ({"capybarra": "a large rodent"}, ValueError, r"'capybarra', which names no new class.*exactly"),
        ({"Red Panda": "a small mammal"}, ValueError, r"'Red Panda'.*did you mean 'red panda'\?"),
        ({"capybara": ""}, ValueError, r"descriptions\['capybara'\] must be a non-empty string"),
        ({"capybara": ["a large rodent"]}, ValueError, r"descriptions\['capybara'\] must be a non-empty string"),
    ],
    ids=["list", "misspelt", "case", "empty-text", "not-text"],
)
def test_bad_descriptions_fail_before_anything_happens(descriptions, error, match):
    model = _model()
    snapshot = _snapshot(model)
    embedder = FakeEmbedder()
    with pytest.raises(error, match=match):
        _inject(model, NEW, embedder=embedder, descriptions=descriptions, inplace=True)
    assert embedder.calls == []
    _assert_unchanged(model, snapshot)


def test_descriptions_may_describe_the_heads_own_classes():
    embedder = FakeEmbedder()
    descriptions = {"class 3": "an old class", "capybara": "a large rodent"}
    out = _inject(_model(), NEW, embedder=embedder, descriptions=descriptions)
    assert out.pretrained_cfg["label_names"][-2:] == NEW
    texts = {text for call in embedder.calls for text in call}
    assert {"class 3: an old class", "capybara: a large rodent"} <= texts


def test_existing_names_are_allowed_when_asked():
    out = _inject(_model(), ["class 3", "okapi"], config=InjectionConfig(allow_existing=True))
    assert out.pretrained_cfg["label_names"][-2:] == ["class 3", "okapi"]


def test_too_many_names_fail_fast_without_touching_anything():
    model = _model()
    snapshot = _snapshot(model)
    embedder = FakeEmbedder()
    names = [f"species {i}" for i in range(100_000)]
    with pytest.raises(ValueError, match=rf"100000 names, more than MAX_NEW_CLASSES={MAX_NEW_CLASSES}.*batches"):
        _inject(model, names, embedder=embedder, inplace=True)
    assert embedder.calls == []  # refused before any text was embedded
    _assert_unchanged(model, snapshot)


def test_as_many_names_as_the_limit_work():
    names = [f"species {i}" for i in range(MAX_NEW_CLASSES)]
    out = _inject(_model(), names)
    assert out.num_classes == len(NAMES) + MAX_NEW_CLASSES
    assert out.pretrained_cfg["label_names"][-1] == f"species {MAX_NEW_CLASSES - 1}"


# ---- models -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: _model(0), UnsupportedHeadError, "no classifier to extend"),
        (lambda: nn.Linear(4, 3), UnsupportedHeadError, "get_classifier"),
        (lambda: "resnet50", TypeError, "model must be a timm nn.Module"),
        (lambda: nn.DataParallel(_model(5)), UnsupportedHeadError, r"DataParallel wraps .* pass model\.module"),
    ],
    ids=["num-classes-0", "not-timm", "string", "wrapped"],
)
def test_models_without_a_classifier(make, error, match):
    with pytest.raises(error, match=match):
        _inject(make(), NEW)


def test_class_names_must_match_the_head():
    with pytest.raises(ValueError, match="class_names must be 6 non-empty strings"):
        _inject(_model(), NEW, class_names=NAMES[:5])


def test_train_mode_is_kept_and_stated():
    model = _model().train()
    with pytest.warns(UserWarning, match=r"train mode.*stays in train mode.*\.eval\(\)"):
        out = _inject(model, NEW)
    assert out.training and find_head(out).num_classes == len(NAMES) + 2
    assert model.training  # the input is untouched


def test_eval_mode_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _inject(_model(), NEW)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_heads_keep_dtype_and_exact_old_logits(dtype):
    model = _model(dtype=dtype)
    out = _inject(model, NEW)
    assert {p.dtype for p in out.parameters()} == {dtype}
    assert model.get_classifier().weight.shape[0] == len(NAMES)
    x = torch.randn(3, 96).to(dtype)
    with torch.no_grad():
        old, new = model.get_classifier()(x), out.get_classifier()(x)
    assert new.shape == (3, len(NAMES) + 2) and new.dtype == dtype
    assert torch.equal(new[:, : len(NAMES)], old)
    assert torch.isfinite(new).all()


def test_the_input_model_is_not_mutated():
    model = _model()
    snapshot = _snapshot(model)
    out = _inject(model, NEW)
    assert out is not model
    _assert_unchanged(model, snapshot)


# ---- trained injectors ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An ICIS injector trained on the head of a seeded model, saved to disk."""
    torch.manual_seed(0)
    model = _model()
    injector = ICISInjector(FAST)
    _inject(model, NEW, injector=injector)
    path = tmp_path_factory.mktemp("injector") / "icis.safetensors"
    injector.save(str(path))
    return model, path


def test_a_saved_injector_is_reused_on_its_own_head(trained):
    model, path = trained
    out = _inject(model, ["okapi"], injector=ICISInjector.load(str(path)))
    assert out.num_classes == len(NAMES) + 1


def test_a_saved_injector_refuses_another_head(trained, monkeypatch):
    _, path = trained
    torch.manual_seed(1)
    other = _model()
    snapshot = _snapshot(other)
    monkeypatch.setattr(FakeEmbedder, "encode", lambda self, texts: pytest.fail("embedded before the check"))
    with pytest.raises(ValueError, match=r"trained on another head \(fingerprint [0-9a-f]+, this head [0-9a-f]+\)"):
        _inject(other, ["okapi"], injector=ICISInjector.load(str(path)), inplace=True)
    _assert_unchanged(other, snapshot)


def test_a_saved_injector_refuses_another_descriptor_width(trained):
    model, path = trained
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"descriptors must be \[n, 16\].*same embedder"):
        _inject(model, ["okapi"], injector=ICISInjector.load(str(path)), embedder=FakeEmbedder(12), inplace=True)
    _assert_unchanged(model, snapshot)


def test_a_saved_injector_keeps_working_after_earlier_injections(trained):
    """Injecting in several calls reuses one trained injector: its head is the first part of this one."""
    model, path = trained
    first = _inject(model, ["okapi"], injector=ICISInjector.load(str(path)))
    second = _inject(first, ["quokka"], injector=ICISInjector.load(str(path)), class_names=None)
    assert second.pretrained_cfg["label_names"][-2:] == ["okapi", "quokka"]


def test_saving_an_injector_does_not_overwrite(trained):
    _, path = trained
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ICISInjector.load(str(path)).save(str(path))


def test_a_damaged_injector_file(trained, tmp_path):
    _, path = trained
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        ICISInjector.load(str(tmp_path / "cut.safetensors"))


def test_a_hostile_injector_file_does_not_allocate(trained, tmp_path):
    """Metadata claiming a huge latent width is checked against the file's tensors before allocation."""
    import json

    from safetensors.torch import load_file, safe_open, save_file

    _, path = trained
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), "latent_dim": 10**9})
    save_file(load_file(str(path)), str(tmp_path / "evil.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="has shape"):
        ICISInjector.load(str(tmp_path / "evil.safetensors"))
    metadata["history"] = "[" * 100_000
    save_file(load_file(str(path)), str(tmp_path / "deep.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="invalid ICIS injector metadata"):
        ICISInjector.load(str(tmp_path / "deep.safetensors"))


# ---- all or nothing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["metadata", "check"])
def test_inplace_failure_rolls_everything_back(monkeypatch, stage):
    model = _model()
    snapshot = _snapshot(model)
    if stage == "metadata":
        real = api_module._update_metadata

        def broken(target, *args, **kwargs):
            real(target, *args, **kwargs)  # writes the new metadata, then fails
            raise RuntimeError("boom")

        monkeypatch.setattr(api_module, "_update_metadata", broken)
    else:
        head_type = type(find_head(model))
        real_logits = head_type.logits
        calls = []

        def drifting(self, target, features):
            calls.append(1)
            out = real_logits(self, target, features)
            return out + 1 if len(calls) > 1 else out  # the grown head "changes" old logits

        monkeypatch.setattr(head_type, "logits", drifting)
    with pytest.raises(RuntimeError, match=r"boom|old logits"):
        _inject(model, NEW, inplace=True)
    _assert_unchanged(model, snapshot)


def test_non_finite_rows_are_refused(monkeypatch):
    model = _model()
    snapshot = _snapshot(model)

    class NaNInjector:
        name = "nan"

        def fit(self, *args):
            return self

        def predict(self, descriptors):
            return torch.full((len(descriptors), 97), float("nan"))

        def hparams(self):
            return {}

    with pytest.raises(RuntimeError, match="non-finite rows"):
        _inject(model, NEW, injector=NaNInjector(), config=InjectionConfig(calibration="none"), inplace=True)
    _assert_unchanged(model, snapshot)


def test_same_seed_same_rows():
    model = _model()
    a, b = _inject(model, NEW, seed=3), _inject(model, NEW, seed=3)
    assert torch.equal(a.get_classifier().weight, b.get_classifier().weight)
