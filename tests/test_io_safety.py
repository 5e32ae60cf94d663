"""Saving and loading: atomic writes, no silent overwrites, and clear errors for damaged or hostile files."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from classifier_injection import ICISConfig, InjectionConfig, inject, load_injected, save_injected
from classifier_injection.embedders import PrecomputedEmbedder
from classifier_injection.io import CONFIG_KEY, MAX_CONFIG_BYTES, read_saved_config
from classifier_injection.serialization import atomic_save_safetensors, atomic_write_text, read_safetensors

NAMES = [f"class {i}" for i in range(6)]
NEW = ["capybara", "red panda"]


def _embedder() -> PrecomputedEmbedder:
    g = torch.Generator().manual_seed(0)
    return PrecomputedEmbedder({n: torch.randn(8, generator=g).tolist() for n in NAMES + NEW})


def _injected(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(NAMES)).eval().to(dtype)
    return inject(
        model,
        NEW,
        embedder=_embedder(),
        class_names=NAMES,
        config=InjectionConfig(icis=ICISConfig(latent_dim=16, max_epochs=2), calibration="norm"),
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = _injected()
    return save_injected(model, tmp_path_factory.mktemp("saved") / "model"), model


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    """A private copy of the saved model directory, free to damage."""
    return Path(shutil.copytree(saved[0], tmp_path / "copy"))


def _edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _drop_checksum(directory: Path) -> None:
    _edit_config(directory, lambda c: c[CONFIG_KEY].pop("weights_sha256"))


def _rewrite_weights(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))
    _drop_checksum(directory)  # so the check under test is reached, not the checksum


def _images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---- round trip -------------------------------------------------------------------------------------


def test_round_trip_is_exact_and_keeps_names_and_provenance(saved):
    path, model = saved
    loaded = load_injected(path)
    with torch.no_grad():
        assert torch.equal(loaded(_images()), model(_images()))
    assert loaded.num_classes == len(NAMES) + len(NEW)
    assert loaded.pretrained_cfg["label_names"] == NAMES + NEW
    assert loaded.classifier_injection["injections"][0]["names"] == NEW
    assert not loaded.training


def test_plain_timm_reloads_the_directory(saved):
    path, model = saved
    reloaded = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    assert reloaded.pretrained_cfg["label_names"] == NAMES + NEW
    with torch.no_grad():  # plain nn.Linear: same values up to float rounding
        torch.testing.assert_close(reloaded(_images()), model(_images()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_keeps_half_dtypes(dtype, tmp_path):
    model = _injected(dtype)
    loaded = load_injected(save_injected(model, tmp_path / "m"))
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    x = torch.randn(2, 96, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(loaded.get_classifier()(x), model.get_classifier()(x))


def test_saving_does_not_modify_the_model(tmp_path):
    model = _injected()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_injected(model, tmp_path / "m")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- no overwrite, atomic writes --------------------------------------------------------------------


def test_existing_path_is_not_overwritten_unless_asked(saved, copy):
    mtime = (copy / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_injected(saved[1], copy)
    assert (copy / "model.safetensors").stat().st_mtime_ns == mtime
    save_injected(saved[1], copy, overwrite=True)
    assert load_injected(copy).num_classes == 8


def test_overwrite_never_replaces_a_directory_of_other_files(saved, tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"refusing to replace .*notes\.txt"):
        save_injected(saved[1], tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        save_injected(saved[1], tmp_path / "file", overwrite=True)


def test_an_empty_directory_is_used(saved, tmp_path):
    (tmp_path / "out").mkdir()
    save_injected(saved[1], tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_failing_save_leaves_nothing_behind(saved, copy, monkeypatch):
    import timm.models

    def broken_save(model, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(timm.models, "save_for_hf", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_injected(saved[1], copy.parent / "new")
    with pytest.raises(OSError, match="disk full"):
        save_injected(saved[1], copy, overwrite=True)
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy"]  # no temp dirs, no "new"
    assert load_injected(copy).num_classes == 8  # the previous model is intact


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_atomic_writes_leave_the_permissions_a_plain_write_would(tmp_path):
    umask = os.umask(0o027)
    try:
        directory = save_injected(_injected(), tmp_path / "model")  # not mkdtemp's 0700, nor safetensors' 0600
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750
        assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in directory.iterdir()} == {
            "model.safetensors": 0o640,
            "config.json": 0o640,
            "README.md": 0o640,
        }
        new = atomic_save_safetensors({"a": torch.zeros(2)}, tmp_path / "new.safetensors")
        assert stat.S_IMODE(new.stat().st_mode) == 0o640  # not mkstemp's private 0600
        existing = tmp_path / "existing.txt"
        existing.write_text("old")
        existing.chmod(0o604)
        atomic_write_text(existing, "new")
        assert stat.S_IMODE(existing.stat().st_mode) == 0o604 and existing.read_text() == "new"
    finally:
        os.umask(umask)


def test_atomic_safetensors_refuses_to_overwrite(tmp_path):
    path = tmp_path / "t.safetensors"
    atomic_save_safetensors({"a": torch.zeros(2)}, path, {"k": "v"})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_save_safetensors({"a": torch.ones(2)}, path, {})
    atomic_save_safetensors({"a": torch.ones(2)}, path, {}, overwrite=True)
    assert torch.equal(read_safetensors(path)[0]["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


# ---- damaged safetensors ----------------------------------------------------------------------------


def test_truncated_weights_are_detected_by_the_checksum(copy):
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"SHA-256.*corrupted"):
        load_injected(copy)
    _drop_checksum(copy)
    with pytest.raises(ValueError, match="truncated"):
        load_injected(copy)


def test_flipped_data_bytes_are_detected_by_the_checksum(copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_injected(copy)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "truncated"),
        (b"\x05\x00", "truncated"),
        ((2**40).to_bytes(8, "little") + b"{}", "header claims"),
        ((50).to_bytes(8, "little") + b"{}", "truncated"),
        ((12).to_bytes(8, "little") + b"{not json!!}", "not a valid safetensors"),
        ((2).to_bytes(8, "little") + b"[]", "not a valid safetensors"),
    ],
)
def test_broken_safetensors_files_give_clear_errors(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_safetensors(path)


def test_corrupted_header_json(copy):
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[9:20] = b"\x00" * 11  # inside the JSON header
    weights.write_bytes(bytes(data))
    _drop_checksum(copy)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_injected(copy)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.__setitem__("fc.weight", torch.zeros(8, 95)), r"'fc\.weight' has shape \(8, 95\)"),
        (lambda t: t.__setitem__("fc.weight", torch.zeros(8, 96, dtype=torch.int32)), "floating dtype"),
        (lambda t: t.__setitem__("fc.bias", torch.zeros(8, dtype=torch.float16)), "mixes floating dtypes"),
        (lambda t: t.__setitem__("fc.weight", torch.full((8, 96), float("nan"))), "NaN or infinite"),
        (lambda t: t.pop("fc.bias"), r"'fc\.bias' missing"),
        (lambda t: t.__setitem__("evil", torch.zeros(1)), "'evil' unexpected"),
    ],
    ids=["shape", "int-dtype", "mixed-dtype", "nan", "missing-key", "extra-key"],
)
def test_weights_that_do_not_fit_the_model(copy, edit, match):
    _rewrite_weights(copy, edit)
    with pytest.raises(ValueError, match=match):
        load_injected(copy)


def test_pickles_are_never_loaded(copy, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (copy / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    _drop_checksum(copy)
    with pytest.raises(ValueError, match="safetensors"):
        load_injected(copy)
    (copy / "model.safetensors").unlink()
    (copy / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(FileNotFoundError, match="never pickles"):
        load_injected(copy)
    assert not marker.exists()


# ---- hostile config.json ----------------------------------------------------------------------------


def _set(key, value):
    return lambda c: c.__setitem__(key, value)


def _set_record(key, value):
    return lambda c: c[CONFIG_KEY].__setitem__(key, value)


def _set_cfg(key, value):
    return lambda c: c["pretrained_cfg"].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("architecture", "hf-hub:someone/evil"), "'architecture' must name a timm model"),
        (_set("architecture", "local-dir:/tmp"), "'architecture' must name a timm model"),
        (_set("architecture", "no_such_net"), "'architecture' must name a timm model"),
        (_set("architecture", ["test_resnet"]), "'architecture' must name a timm model"),
        (_set("num_classes", "8"), "'num_classes' must be an int"),
        (_set("num_classes", True), "'num_classes' must be an int"),
        (_set("num_classes", 10**12), "'num_classes' must be an int"),
        (_set("num_classes", 9), r"model_args\.num_classes \(8\) differs"),
        (_set("model_args", {"checkpoint_path": "/tmp/evil.pth"}), "loading arguments are never taken"),
        (_set("model_args", {"pretrained": True}), "loading arguments are never taken"),
        (_set("model_args", [1, 2]), "model_args must be an object"),
        (_set("model_args", {"__class__": 1}), "invalid argument name"),
        (_set("model_args", {"no_such_arg": 1}), "cannot build test_resnet"),
        (_set("model_args", {"in_chans": 10**5}), "has shape"),  # checked on the meta device: no allocation
        (_set("label_names", ["a"] * 1_000_000), "label_names must be a list of 8 names"),
        (_set("label_names", [1] * 8), r"label_names\[0\] must be a string"),
        (_set("label_names", "abc"), "label_names must be a list of 8 names"),
        (_set("pretrained_cfg", [1]), "'pretrained_cfg' must be an object"),
        (_set_cfg("mean", "abc"), "mean must be a list of numbers"),
        (_set_cfg("std", [0, 1, 1]), "std must be positive"),
        (_set_cfg("input_size", [3, -1, 5]), "input_size must be"),
        (_set_cfg("interpolation", "exec"), "interpolation must be one of"),
        (_set_cfg("crop_pct", "big"), "crop_pct must be"),
        (_set_cfg("label_descriptions", {"a": 1}), "label_descriptions must map"),
        (_set(CONFIG_KEY, "yes"), "no 'classifier_injection' block"),
        (lambda c: c.pop(CONFIG_KEY), "no 'classifier_injection' block"),
        (_set_record("segments", [6, 3]), "segments must be positive ints summing to 8"),
        (_set_record("segments", [6, "2"]), "segments must be"),
        (_set_record("segments", [8, 0]), "segments must be"),
        (_set_record("injections", {"a": 1}), "injections must be a list"),
        (_set_record("weights_sha256", 12), "weights_sha256 must be"),
    ],
)
def test_hostile_config_values(copy, edit, match, monkeypatch):
    import timm

    built: list[str] = []
    create_model = timm.create_model

    def recording(*args, **kwargs):
        built.append(torch.get_default_device().type)
        return create_model(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    _edit_config(copy, edit)
    with pytest.raises(ValueError, match=match):
        load_injected(copy)
    assert set(built) <= {"meta"}, "refused before any real model was built (sizes are checked on the meta device)"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"num_classes": NaN}', "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        ("\udcff", "not valid JSON"),
    ],
    ids=["syntax", "array", "nan", "deep-nesting", "bad-utf8"],
)
def test_config_that_is_not_a_json_object(copy, text, match):
    (copy / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=match):
        load_injected(copy)


def test_oversized_config_is_not_parsed(copy):
    with open(copy / "config.json", "r+b") as f:
        f.truncate(MAX_CONFIG_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ValueError, match="refusing to parse"):
        read_saved_config(copy)


def test_missing_files(copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_injected(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_injected(tmp_path)
    (copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        load_injected(copy)


def test_plain_timm_directory_loads_only_when_allowed(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    timm.models.save_for_hf(model, str(tmp_path), safe_serialization=True)
    with pytest.raises(ValueError, match="not written by save_injected"):
        load_injected(tmp_path)
    loaded = load_injected(tmp_path, require_record=False)
    with torch.no_grad():
        assert torch.equal(loaded(_images()), model(_images()))
