"""The zoo sweep (benchmarks/studies/zoo.py): a fast check of its machinery, and the full sweep behind ``slow``.

Full sweep, as a command (records run ``zoo`` in benchmarks/results/zoo/)::

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.zoo

or as a test: ``.venv/bin/pytest -m slow tests/test_zoo.py``.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.studies.zoo import check_meta, check_real, run

REASONS = {
    "resnet50_clip": "projection head (image-text embedding, not classes)",
    "deepseek_vit_412m_enc": "no get_classifier (encoder only)",
    "aimv2_1b_patch14_224": "no classifier (num_classes=0 / Identity head)",
}


@pytest.mark.parametrize(
    ("name", "status", "family"),
    [
        ("levit_384_s8", "supported", "distilled"),  # its cfg lists only one of the twins
        ("efficientvim_m1_dist", "supported", "multi_branch"),
        ("volo_d1_224", "supported", "aux_token"),
        ("dla34", "supported", "conv1x1"),
        ("resnet50_clip", "refused", ""),
        ("deepseek_vit_412m_enc", "refused", ""),
        ("aimv2_1b_patch14_224", "refused", ""),
    ],
)
def test_meta_check_classifies_models(name, status, family):
    result = check_meta(name)
    assert (result.status, result.family) == (status, family), result.reason
    if status == "refused":
        assert result.reason == REASONS[name]


def test_real_check_compares_old_logits():
    assert check_real("test_resnet") == "exact"


def test_sweep_records_its_summary_and_models(tmp_path):
    results = run(["test_vit", "test_resnet", "resnet50_clip"], root=tmp_path, command="the command")
    assert [r.status for r in results] == ["refused", "supported", "supported"]
    readme = (tmp_path / "zoo" / "README.md").read_text()
    assert "| supported | 2 |" in readme and "| failed | 0 |" in readme and "`the command`" in readme
    sample = json.loads((tmp_path / "zoo" / "results.json").read_text())["runs"]["sample"]
    assert [m["name"] for m in sample["results"]["models"]] == ["resnet50_clip", "test_resnet", "test_vit"]


@pytest.mark.slow
def test_whole_zoo_has_no_failures(tmp_path):
    results = run(root=tmp_path)
    failed = [f"{r.name}: {r.reason}" for r in results if r.status == "failed"]
    assert len(results) > 1000
    assert not failed, failed
