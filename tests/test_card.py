"""The model card save_injected writes: Hugging Face metadata, literal class names, ignored on load, Hub-ready."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch

from classifier_injection import ICISConfig, InjectionConfig, inject, load_injected, save_injected
from classifier_injection.card import card_license, model_card
from classifier_injection.io import read_saved_config

from .conftest import FakeEmbedder

NAMES = [f"class {i}" for i in range(4)]
#: Class names and a description that would break YAML or markdown if pasted in verbatim.
HOSTILE = [
    'key: "value" # comment',
    "it's",
    "two\nlines\r\n---",
    "| a | b |",
    "<script>alert(1)</script>",
    "*bold* _it_ `code` [link](http://x) ![img](y) ~~s~~ $x$ &amp; \\",
]
DESCRIPTIONS = {HOSTILE[0]: "line one\n---\nlicense: mit\n# heading"}


def _inject(model: torch.nn.Module, names: list[str], **kwargs) -> torch.nn.Module:
    return inject(
        model,
        names,
        embedder=FakeEmbedder(),
        config=InjectionConfig(icis=ICISConfig(latent_dim=16, max_epochs=2), calibration="norm"),
        **kwargs,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(NAMES)).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "license": "cc-by-nc-4.0", "label_names": NAMES}
    model = _inject(_inject(model, ["capybara"]), HOSTILE, descriptions=DESCRIPTIONS)
    return save_injected(model, tmp_path_factory.mktemp("card") / "model"), model


def _split(card: str) -> tuple[str, str]:
    """(YAML front matter, markdown body) of a model card."""
    assert card.startswith("---\n")
    front, _, body = card[4:].partition("\n---\n")
    return front, body


def test_front_matter_is_hub_metadata(saved):
    yaml = pytest.importorskip("yaml")
    from huggingface_hub import metadata_load

    path, model = saved
    front, _ = _split((path / "README.md").read_text(encoding="utf-8"))
    expected = {
        "library_name": "timm",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "classifier-injection"],
        "license": "cc-by-nc-4.0",  # carried from the base model's pretrained_cfg
        "base_model": model.pretrained_cfg["hf_hub_id"],
    }
    assert yaml.safe_load(front) == expected
    assert metadata_load(path / "README.md") == expected  # the Hub client's own parser


def _table_cells(body: str, column: str) -> list[str]:
    """The rendered text of ``column`` in every markdown table that has it (GFM tables, markdown-it)."""
    markdown_it = pytest.importorskip("markdown_it")
    tokens = markdown_it.MarkdownIt("commonmark").enable("table").parse(body)
    cells, index, row, in_table = [], None, [], False
    for token in tokens:
        if token.type in ("table_open", "table_close"):
            in_table, index = token.type == "table_open", None
        elif token.type == "tr_open":
            row = []
        elif token.type == "inline" and in_table:
            assert {c.type for c in token.children} <= {"text", "code_inline"}, token.content  # no markup
            row.append("".join(c.content for c in token.children))
        elif token.type == "tr_close" and index is None:
            index = row.index(column) if column in row else -1
        elif token.type == "tr_close" and index >= 0:
            cells.append(row[index])
    return cells


def test_hostile_names_and_descriptions_render_as_literal_text(saved):
    _, body = _split((saved[0] / "README.md").read_text(encoding="utf-8"))
    flat = [" ".join(name.split()) for name in HOSTILE]
    assert _table_cells(body, "class") == ["capybara", *flat]
    descriptions = _table_cells(body, "description")
    assert descriptions[1] == " ".join(DESCRIPTIONS[HOSTILE[0]].split())
    assert "\n---\n" not in body and "<script>" not in body  # nothing closes the front matter or opens HTML


def test_card_describes_every_injection(saved):
    path = saved[0]
    card = (path / "README.md").read_text(encoding="utf-8")
    assert "### Injection 1: 1 class\n" in card and f"### Injection 2: {len(HOSTILE)} classes\n" in card
    assert "11 (4 original + 7 injected)" in card and "bit-identical" in card
    assert card.count("- **Method:** `icis`") == 2 and card.count("- **Text embedder:** `fake-16`") == 2
    assert card.count("- **Calibration:** `norm`") == 2
    assert "| 4 | capybara | pig-sized tailless South American" in card  # WordNet, found by name
    assert card.count("| wordnet-lemma |") == 1 and card.count("| user |") == 1 and card.count("| none |") == 5
    for loader in ('"local-dir:PATH"', '"hf-hub:USER/REPO"', 'load_injected("PATH")', "upload_folder("):
        assert loader in card


def test_calibration_diagnostics_and_per_class_reliability_are_tabulated():
    entry = {
        "names": ["okapi", "ka|kapo"],
        "num_classes_before": 3,
        "descriptions": {"okapi": {"text": ["a giraffe relative", "a striped ungulate"], "source": "wordnet-senses"}},
        "calibration": {
            "name": "synthesize",
            "factor": 1.25,
            "biases": [0.1, 0.2],
            "diagnostics": {"simulated_H": 66.666, "fallback_from": None, "expected": {"recall": [[1.0]]}},
        },
        "reliability": {
            "okapi": {"nearest": [["zebra", 0.8], ["ox", 0.7]], "expected_precision": 50.5, "expected_recall": 40.0},
            "ka|kapo": {"nearest": [["kea|x", 0.9]]},
        },
        "expected": {
            "new_classes": 2,
            "simulated_new_classes": 1,
            "new_class_scale": 1.0,
            "recall": 64.5,
            "precision": 20.0,
        },
    }
    card = model_card({"architecture": "resnet18", "num_classes": 5, "classifier_injection": {"injections": [entry]}})
    expected = "precision 20 %, recall 64.5 % (simulated with 1 new classes at new_class_scale 1)"
    assert f"- **Expected (the calibration's simulation):** {expected}" in card
    assert "- **Calibration:** `synthesize` (factor 1.25); one value per class for biases" in card
    assert "Target precision" not in card
    chosen = model_card(
        {
            "architecture": "resnet18",
            "num_classes": 5,
            "classifier_injection": {"injections": [{**entry, "new_class_scale": 0.87, "target_precision": 0.3}]},
        }
    )
    assert "- **New-class scale:** 0.87" in chosen and "- **Target precision:** 0.3" in chosen
    assert "| simulated\\_H | 66.67 |" in card and "| fallback\\_from | None |" in card
    assert "| expected | see `config.json` |" in card
    assert "| new class | expected precision (%) | expected recall (%) | nearest old classes |" in card
    assert "| okapi | 50.5 | 40 | zebra, ox |" in card and "| ka\\|kapo | - | - | kea\\|x |" in card
    assert "| 3 | okapi | a giraffe relative / a striped ungulate | wordnet-senses |" in card
    assert "| 4 | ka\\|kapo | - | - |" in card
    # Without any rates (the fallback rule records none) the table keeps the nearest old classes alone.
    unrated = {**entry, "reliability": {"okapi": {"nearest": [["zebra", 0.8]]}}}
    card = model_card({"architecture": "vit", "num_classes": 5, "classifier_injection": {"injections": [unrated]}})
    assert "Nearest old classes by row cosine (the calibration recorded no expected rates):" in card
    assert "| new class | nearest old classes |" in card and "| okapi | zebra |" in card
    assert "expected precision (%)" not in card


@pytest.mark.parametrize(
    ("license", "fields"),
    [
        ("apache-2.0", {"license": "apache-2.0"}),
        ("MIT", {"license": "mit"}),
        ("dinov3-license", {"license": "other", "license_name": "dinov3-license"}),
        ("unknown", {}),
        (None, {}),
        ("mit\nbase_model: evil/repo", {}),
        ("apache 2.0", {}),
    ],
)
def test_license_is_carried_only_as_an_identifier(license, fields):
    assert card_license({"license": license}) == fields


@pytest.mark.parametrize("base_model", [None, "resnet18", "a/b/c", "evil/repo\nlicense: mit", "x/y z"])
def test_base_model_is_omitted_unless_a_hub_id(base_model):
    card = model_card({"architecture": "resnet18", "num_classes": 2}, base_model=base_model)
    front, body = _split(card)
    assert "base_model" not in front and "not recorded" in body


def test_loading_ignores_the_card(saved, tmp_path):
    path, model = saved
    copy = Path(shutil.copytree(path, tmp_path / "copy"))
    (copy / "README.md").write_bytes(b"---\n\xff: [unclosed\n" + b"x" * 100_000)  # not UTF-8, not YAML
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_injected(copy)(x), model(x))
        torch.testing.assert_close(timm.create_model(f"local-dir:{copy}", pretrained=True).eval()(x), model(x))
    assert read_saved_config(copy)["num_classes"] == 11
    (copy / "README.md").unlink()  # folders saved before the card existed still load
    assert load_injected(copy).num_classes == 11


def _hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> None:
    """Lay ``files`` out as huggingface_hub's cache holds a downloaded ``main`` revision of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, source in files.items():
        target = repo / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)


def test_upload_folder_publishes_what_hf_hub_loading_needs(saved, tmp_path, monkeypatch):
    """upload_folder on the saved folder (network calls replaced), then timm's hf-hub: loader on what it sent."""
    import huggingface_hub
    import huggingface_hub.hf_api
    from huggingface_hub import HfApi, metadata_load
    from timm.models import load_model_config_from_hf

    path, model = saved
    sent: dict[str, Path] = {}

    def create_commit(self, repo_id, operations, **kwargs):
        sent.update({op.path_in_repo: Path(op.path_or_fileobj) for op in operations})
        return "committed"

    monkeypatch.setattr(huggingface_hub.hf_api, "is_xet_available", lambda: False)  # the single-commit path
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, content, **kw: metadata_load(path / "README.md"))
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    assert HfApi(token=False).upload_folder(repo_id="user/lite-plus", folder_path=str(path)) == "committed"
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors"]

    _hub_cache(tmp_path / "hub", "user/lite-plus", sent)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # served from the cache, never fetched
    pretrained_cfg, architecture, _ = load_model_config_from_hf("user/lite-plus", cache_dir=tmp_path / "hub")
    assert architecture == "test_resnet" and pretrained_cfg["label_names"] == [*NAMES, "capybara", *HOSTILE]
    reloaded = timm.create_model("hf-hub:user/lite-plus", pretrained=True, cache_dir=tmp_path / "hub").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x))


def test_a_failing_card_leaves_the_previous_model_intact(saved, tmp_path, monkeypatch):
    import classifier_injection.io

    path, model = saved
    target = Path(shutil.copytree(path, tmp_path / "target"))
    monkeypatch.setattr(classifier_injection.io, "model_card", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_injected(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # no temporary directories
    assert (target / "README.md").read_bytes() == (path / "README.md").read_bytes()
