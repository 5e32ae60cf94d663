"""Where studies keep their numbers: ``benchmarks/results/<study>/results.json`` and a README generated from it.

One JSON per study holds its runs by name (``--out`` / ``--name``); each run records the exact command, the
date, the machine, the markdown table the study printed, and the numbers. ``README.md`` is rebuilt from the JSON
on every write, so the two never disagree. Plots of a study go next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.harness.data import RESULTS
from classifier_injection.serialization import atomic_write_text

__all__ = ["command_line", "load_study", "machine", "machine_line", "readme", "record", "study_dir", "study_parser"]


def study_dir(study: str, root: Path = RESULTS) -> Path:
    """``benchmarks/results/<study>/`` (created); ``root`` replaces ``benchmarks/results`` (tests)."""
    path = Path(root) / study
    path.mkdir(parents=True, exist_ok=True)
    return path


def study_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a study run as ``python -m prog``: its module docstring, as written, is the help."""
    return argparse.ArgumentParser(
        prog=f"python -m {prog}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this process: ``module`` with ``argv`` (default: this process's arguments)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["HF_HUB_OFFLINE=1 .venv/bin/python -m", module, *map(shlex.quote, args)])


def machine() -> dict:
    """This machine, as recorded with every run."""
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
    }


def machine_line(info: dict | str | None) -> str:
    """One line for a README from :func:`machine`'s dict (or a text recorded instead)."""
    if not isinstance(info, dict):
        return info or "not recorded"
    return (
        f"{info.get('cpu_count')} CPUs ({info.get('processor')}), {info.get('platform')}, Python {info.get('python')}, "
        f"torch {info.get('torch')}, {info.get('torch_threads')} torch threads"
    )


def load_study(study: str, root: Path = RESULTS) -> dict:
    """The study's ``results.json`` (``{"study", "title", "summary", "runs"}``), empty when none was written."""
    path = Path(root) / study / "results.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"study": study, "title": study, "summary": "", "runs": {}}


def _demoted(markdown: str, levels: int = 2) -> str:
    """Headings of a run's table two levels down, under the README's run heading."""
    return "\n".join("#" * levels + line if line.startswith("#") else line for line in markdown.splitlines())


def readme(doc: dict) -> str:
    """The README of a study: its summary, then per run the command, date, machine and the table it printed."""
    lines = [f"# {doc.get('title') or doc['study']}", ""]
    if doc.get("summary"):
        lines += [_demoted(doc["summary"].strip(), 1), ""]
    lines += [
        f"Numbers: `results.json` (runs by name: {', '.join(f'`{r}`' for r in doc['runs'])}). This file is generated "
        "from it by `benchmarks.harness.results`.",
        "",
    ]
    for name, run in doc["runs"].items():
        lines += [f"## {name}", "", f"Command: `{run['command']}`  ", f"Date: {run['date']}  "]
        lines += [f"Machine: {machine_line(run.get('machine'))}", ""]
        if run.get("note"):
            lines += [run["note"].strip(), ""]
        lines += [_demoted(run["table"].strip()), ""]
    return "\n".join(lines)


def record(
    study: str,
    run: str,
    results: object,
    table: str,
    command: str,
    *,
    title: str | None = None,
    date: str | None = None,
    root: Path = RESULTS,
) -> Path:
    """Store one run of ``study`` (replacing a run of the same name) and rebuild its README; returns the JSON path.

    Args:
        study: the study's folder name.
        run: the run's name within the study.
        results: the run's numbers (JSON-serialisable).
        table: the markdown the study printed for it.
        command: the exact command (:func:`command_line`).
        title: the README's title (kept from earlier runs when ``None``).
        date: ISO date of the run (default: now).
        root: replaces ``benchmarks/results`` (tests).
    """
    doc = load_study(study, root)
    if title is not None:
        doc["title"] = title
    doc["runs"][run] = {
        "command": command,
        "date": date or datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "table": table,
        "results": results,
    }
    folder = study_dir(study, root)
    path = folder / "results.json"
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    atomic_write_text(folder / "README.md", readme(doc))
    return path
