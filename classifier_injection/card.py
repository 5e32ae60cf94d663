"""Hugging Face model card (``README.md``) for a directory written by :func:`~classifier_injection.save_injected`.

:func:`model_card` is a pure function of the saved ``config.json`` dict. User text (class names, descriptions)
never enters the YAML front matter, whose values are library constants or identifiers checked against strict
patterns; in the markdown body it is flattened to one line and every markdown-active character is escaped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["calibration_markdown", "has_expected_rates", "injection_markdown", "model_card"]

TAGS = ("image-classification", "timm", "classifier-injection")

#: License identifiers the Hub knows (https://huggingface.co/docs/hub/repositories-licenses); the ones timm uses.
HUB_LICENSES = frozenset(
    {
        "apache-2.0",
        "mit",
        "bsd-2-clause",
        "bsd-3-clause",
        "cc-by-4.0",
        "cc-by-sa-4.0",
        "cc-by-nc-4.0",
        "cc-by-nc-sa-4.0",
        "cc-by-nc-nd-4.0",
        "cc0-1.0",
        "gpl-3.0",
        "lgpl-3.0",
        "agpl-3.0",
        "gemma",
        "openrail",
        "unlicense",
        "other",
    }
)

_LICENSE_NAME = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#!|~&$])")
_WHITESPACE = re.compile(r"\s+")


def md_text(value: Any) -> str:
    """``value`` as one line of literal markdown text: whitespace collapsed, markdown-active characters escaped."""
    text = "".join(c if c.isprintable() else " " for c in str(value))
    return _MD_SPECIAL.sub(r"\\\1", _WHITESPACE.sub(" ", text).strip())


def _code(value: Any) -> str:
    """``value`` as inline code, or escaped text when it holds backticks (a code span cannot)."""
    text = _WHITESPACE.sub(" ", str(value)).strip()
    return f"`{text}`" if text and "`" not in text and text.isprintable() else md_text(text)


def _number(value: Any) -> str:
    """A compact rendering of a diagnostic value."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return md_text(json.dumps(value, sort_keys=True))
    return md_text(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A markdown table of already escaped cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def card_license(pretrained_cfg: Mapping[str, Any]) -> dict[str, str]:
    """Front-matter license fields from timm's ``pretrained_cfg["license"]``: a Hub id, ``other`` + name, or none."""
    value = pretrained_cfg.get("license")
    if not isinstance(value, str) or not _LICENSE_NAME.fullmatch(value.lower()) or value.lower() == "unknown":
        return {}
    value = value.lower()
    return {"license": value} if value in HUB_LICENSES else {"license": "other", "license_name": value}


def hub_id(value: Any) -> str | None:
    """``value`` if it is a Hub repository id (``owner/name``), else ``None``."""
    return value if isinstance(value, str) and _HUB_ID.fullmatch(value) else None


def front_matter(config: Mapping[str, Any], base_model: str | None) -> str:
    """The YAML front matter: library, pipeline, tags, license and base model (identifiers only, no user text)."""
    lines = ["---", "library_name: timm", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {tag}" for tag in TAGS]
    pretrained_cfg = config.get("pretrained_cfg")
    license_fields = card_license(pretrained_cfg if isinstance(pretrained_cfg, Mapping) else {})
    lines += [f"{k}: {v}" for k, v in license_fields.items()]
    if hub_id(base_model):
        lines.append(f"base_model: {base_model}")
    return "\n".join([*lines, "---"])


def _injections(config: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The provenance entries of the saved ``classifier_injection`` block (malformed ones skipped)."""
    record = config.get("classifier_injection")
    entries = record.get("injections") if isinstance(record, Mapping) else None
    return [e for e in entries if isinstance(e, Mapping)] if isinstance(entries, list) else []


def _class_rows(entry: Mapping[str, Any]) -> list[list[str]]:
    """One table row per injected class: index, name, description and where the description came from."""
    names = entry.get("names") if isinstance(entry.get("names"), list) else []
    start = entry.get("num_classes_before")
    descriptions = entry.get("descriptions") if isinstance(entry.get("descriptions"), Mapping) else {}
    rows = []
    for i, name in enumerate(names):
        described = descriptions.get(name)
        described = described if isinstance(described, Mapping) else {}
        index = str(start + i) if isinstance(start, int) else "?"
        text, source = described.get("text"), described.get("source")
        if isinstance(text, list):  # a name of several WordNet senses is described by all of them
            text = " / ".join(str(t) for t in text)
        rows.append([index, md_text(name), md_text(text) if text else "-", md_text(source) if source else "-"])
    return rows


def calibration_markdown(calibration: Any) -> list[str]:
    """Markdown lines: the calibration rule, its scalar parameters and a table of its diagnostics."""
    if not isinstance(calibration, Mapping):
        return []
    scalars = [
        f"{md_text(k)} {_number(v)}"
        for k, v in calibration.items()
        if k not in ("name", "diagnostics") and isinstance(v, (int, float, str)) and not isinstance(v, bool)
    ]
    per_row = [md_text(k) for k, v in calibration.items() if isinstance(v, list)]
    line = f"- **Calibration:** {_code(calibration.get('name', 'unknown'))}"
    line += f" ({', '.join(scalars)})" if scalars else ""
    line += f"; one value per class for {', '.join(per_row)} (see `config.json`)" if per_row else ""
    lines = [line]
    diagnostics = calibration.get("diagnostics")
    if isinstance(diagnostics, Mapping) and diagnostics:
        # Tables (the expected rates, the reliability bins) are summarised above; their numbers stay in config.json.
        rows = [
            [md_text(k), "see `config.json`" if isinstance(v, dict) else _number(v)] for k, v in diagnostics.items()
        ]
        lines += ["", "Calibration diagnostics (image-free, computed from the model alone):", ""]
        lines += _table(["diagnostic", "value"], rows)
    return lines


#: The per-class rates of a reliability record (``calibration.reliability.assess``), when the rule recorded any.
_RATES = ("expected_precision", "expected_recall")


def has_expected_rates(reliability: Mapping[str, Any]) -> bool:
    """Whether a saved reliability record holds any expected rate (only the nearest old classes otherwise)."""
    return any(isinstance(e, Mapping) and e.get(k) is not None for e in reliability.values() for k in _RATES)


def _reliability_lines(reliability: Any) -> list[str]:
    """A table of the new classes' reliability record (expected precision / recall, nearest old classes)."""
    if not isinstance(reliability, Mapping):
        return []
    entries = {name: entry for name, entry in reliability.items() if isinstance(entry, Mapping)}
    if not entries:
        return []
    rated = has_expected_rates(entries)
    rows = []
    for name, entry in entries.items():
        nearest = entry.get("nearest") if isinstance(entry.get("nearest"), list) else []
        near = ", ".join(md_text(n[0]) for n in nearest if isinstance(n, list) and n)
        rates = [_number(entry[k]) if entry.get(k) is not None else "-" for k in _RATES] if rated else []
        rows.append([md_text(name), *rates, near])
    if not rated:
        intro = "Nearest old classes by row cosine (the calibration recorded no expected rates):"
        return ["", intro, "", *_table(["new class", "nearest old classes"], rows)]
    header = ["new class", "expected precision (%)", "expected recall (%)", "nearest old classes"]
    intro = (
        "Reliability (each class alone, as the calibration's simulation expects; nearest old classes by row cosine):"
    )
    return ["", intro, "", *_table(header, rows)]


def _expected(expected: Any) -> str | None:
    """The expected recall / precision of an injection's record, or ``None``."""
    if not isinstance(expected, Mapping):
        return None
    rates = {k: expected.get(k) for k in ("recall", "precision", "simulated_new_classes", "new_class_scale")}
    return (
        f"precision {_number(rates['precision'])} %, recall {_number(rates['recall'])} % "
        f"(simulated with {_number(rates['simulated_new_classes'])} new classes at new_class_scale "
        f"{_number(rates['new_class_scale'])})"
    )


def injection_markdown(number: int, entry: Mapping[str, Any]) -> list[str]:
    """Markdown lines for one provenance entry: its classes, method, embedder, calibration and diagnostics."""
    rows = _class_rows(entry)
    lines = [f"### Injection {number}: {len(rows)} class{'es' if len(rows) != 1 else ''}", ""]
    lines += [*_table(["index", "class", "description", "description source"], rows), ""]
    head = entry.get("head") if isinstance(entry.get("head"), Mapping) else {}
    details = [
        ("Method", _code(entry.get("method", "unknown"))),
        ("Text embedder", _code(entry.get("embedder", "unknown"))),
        ("Head", f"{_code(head.get('path', '?'))} ({md_text(head.get('family', '?'))})" if head else None),
        ("Seed", _number(entry["seed"]) if "seed" in entry else None),
        ("New-class scale", _number(entry["new_class_scale"]) if "new_class_scale" in entry else None),
        ("Target precision", _number(entry.get("target_precision")) if entry.get("target_precision") else None),
        ("Expected (the calibration's simulation)", _expected(entry.get("expected"))),
    ]
    lines += [f"- **{label}:** {value}" for label, value in details if value is not None]
    lines += calibration_markdown(entry.get("calibration"))
    return lines + _reliability_lines(entry.get("reliability"))


def _usage(architecture: str) -> list[str]:
    """How to load the folder: plain timm (local or Hub) and classifier_injection."""
    return [
        "## How to load",
        "",
        "```python",
        "import timm",
        'model = timm.create_model("local-dir:PATH", pretrained=True)  # this folder, plain timm',
        'labels = model.pretrained_cfg["label_names"]',
        "",
        "from huggingface_hub import upload_folder",
        'upload_folder(repo_id="USER/REPO", folder_path="PATH")  # publish this folder as is',
        'model = timm.create_model("hf-hub:USER/REPO", pretrained=True)',
        "",
        "from classifier_injection import load_injected",
        'model = load_injected("PATH")  # segmented head: old logits bit-identical to the base model',
        "```",
        "",
        f"Plain timm builds a `{architecture}` with an ordinary classifier layer: the old logits then equal the "
        "base model's up to float rounding; `load_injected` restores the segmented head for bit-identical ones.",
    ]


def model_card(config: Mapping[str, Any], *, base_model: str | None = None) -> str:
    """The ``README.md`` text (YAML front matter + markdown) describing a saved ``config.json`` dict.

    Args:
        config: the ``config.json`` content written by ``save_injected``.
        base_model: Hub id of the base weights (e.g. ``"timm/resnet50.a1_in1k"``); omitted when not a valid id.
    """
    architecture = str(config.get("architecture", "unknown"))
    num_classes = config.get("num_classes")
    injections = _injections(config)
    added = sum(len(e["names"]) for e in injections if isinstance(e.get("names"), list))
    before = injections[0].get("num_classes_before") if injections else num_classes
    base = f"[{base_model}](https://huggingface.co/{base_model})" if hub_id(base_model) else None
    lines = [
        front_matter(config, base_model),
        f"# Model card for {md_text(architecture)} with {added} injected class{'es' if added != 1 else ''}",
        "",
        f"A timm `{architecture}` classifier{f' ({base})' if base else ''} given new classes from their names "
        "and descriptions alone, with no images and no fine-tuning, by the `classifier_injection` library "
        "(ICIS, Christensen et al., ICCV 2023).",
        "",
        "## Model details",
        "",
        f"- **Architecture:** `{architecture}` (timm)",
        f"- **Base model:** {base or 'not recorded'}",
        f"- **Classes:** {_number(num_classes)} ({_number(before)} original + {added} injected)",
        "",
        "The original classes are unchanged: their logits are bit-identical to the base model's (the head "
        "evaluates its rows in the segments they were added in). Class names are in `config.json` "
        "(`label_names`), the full provenance under `classifier_injection`.",
        "",
        "## Injected classes",
        "",
    ]
    for number, entry in enumerate(injections, 1):
        lines += [*injection_markdown(number, entry), ""]
    if not injections:
        lines += ["None: this folder holds the base model as saved by `save_injected`.", ""]
    return "\n".join(lines + _usage(architecture)) + "\n"
