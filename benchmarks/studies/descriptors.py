"""Which descriptors make the best injected rows? Names vs templates vs definitions, per embedder.

Protocol (same as the rest of the benchmark): the real 1000-class head of ``tf_efficientnet_lite0``, the 5
folds of 200 held-out classes (``benchmarks.harness.data.fold_classes``). In fold k the 800 other classes are
"seen": an injector learns descriptor -> row from them and predicts rows for the 200 held-out classes,
which are then described exactly as a user's new classes would be:

* seen classes: their WordNet definition, by WordNet id (what :func:`inject` does for ImageNet heads);
* held-out classes: a WordNet look-up of their *name* (first lemma), with the library's ambiguity policy
  (default ``"average"``: a name with several senses gets the mean of their embeddings; 147 of the 1000 names).

Scores: ZSL top-1 (held-out photos among held-out classes), GZSL S/U/H (extended head: 800 real rows + 200
injected), and an image-free check: mean cosine between predicted and true rows of the held-out classes.
Two injectors: the library's closed-form ridge regression (fast, all variants) and ICIS with library defaults
and the library default calibration (the few variants that matter). Results: ``benchmarks/results/descriptors/``.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.descriptors            # ridge, all variants
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.descriptors --icis     # + ICIS on the key variants
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.descriptors --only --methods icis vgse-smo ...  # any
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from benchmarks.harness.data import CACHE, HeadData, fold_classes, head_data
from benchmarks.harness.descriptors import concat, conceptnet_matrix, fold_matrix, text_matrices
from benchmarks.harness.methods import make_injector, run_any
from benchmarks.harness.results import command_line, record
from classifier_injection.descriptors import DescriptorConfig
from classifier_injection.embedders import SentenceTransformerEmbedder, WordVectorEmbedder

STUDY = "descriptors"
#: open_clip's short list of CLIP templates (the 80-template preset costs 80 texts a class: 80k on ImageNet).
SIMPLE_TEMPLATES = (
    "itap of a {name}.",
    "a bad photo of the {name}.",
    "a origami {name}.",
    "a photo of the large {name}.",
    "a {name} in a video game.",
    "art of the {name}.",
    "a photo of the small {name}.",
)
MPNET = CACHE / "all-mpnet-base-v2" / "all-mpnet-base-v2"


def variants() -> dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    minilm = SentenceTransformerEmbedder()
    glove = WordVectorEmbedder()
    preset = DescriptorConfig.from_preset
    cn = conceptnet_matrix()

    def m(name, **kw):
        return lambda: text_matrices(minilm, preset(name), **kw)

    def g(name):
        return lambda: text_matrices(glove, preset(name))

    found = {
        "minilm/name": m("name"),
        "minilm/photo": m("photo"),
        "minilm/ensemble (7 CLIP templates)": lambda: text_matrices(
            minilm, DescriptorConfig(templates=SIMPLE_TEMPLATES, use_definitions=False)
        ),
        "minilm/definition": m("definition"),
        "minilm/name+definition": m("name+definition"),
        "minilm/photo+definition": m("photo+definition"),
        "minilm/name&definition": m("name&definition"),
        "minilm/name+definition (new: no definitions)": m("name+definition", new_have_definitions=False),
        "minilm/name+definition (ambiguous: first)": lambda: text_matrices(
            minilm, preset("name+definition", ambiguous="first")
        ),
        "minilm/name+definition (ambiguous: headword)": lambda: text_matrices(
            minilm, preset("name+definition", ambiguous="headword")
        ),
        "glove/name": g("name"),
        "glove/name+definition": g("name+definition"),
        "minilm/name+definition + glove/name": lambda: concat(
            text_matrices(minilm, preset("name+definition")), text_matrices(glove, preset("name"))
        ),
        "minilm/photo + glove/name": lambda: concat(
            text_matrices(minilm, preset("photo")), text_matrices(glove, preset("name"))
        ),
        "conceptnet/name [1000 names only]": lambda: (cn, cn),
        "minilm/name+definition + conceptnet [1000 names only]": lambda: concat(
            text_matrices(minilm, preset("name+definition")), (cn, cn)
        ),
    }
    if MPNET.is_dir():  # optional: all-mpnet-base-v2 assembled from its PyPI parts (offline-resources note)
        mpnet = SentenceTransformerEmbedder(str(MPNET))
        found["mpnet/photo"] = lambda: text_matrices(mpnet, preset("photo"))
        found["mpnet/name+definition"] = lambda: text_matrices(mpnet, preset("name+definition"))
        found["minilm/name+definition + mpnet/name+definition"] = lambda: concat(
            text_matrices(minilm, preset("name+definition")), text_matrices(mpnet, preset("name+definition"))
        )
        found["minilm/photo + mpnet/photo"] = lambda: concat(
            text_matrices(minilm, preset("photo")), text_matrices(mpnet, preset("photo"))
        )
    return found


def evaluate(data: HeadData, seen_a: torch.Tensor, new_a: torch.Tensor, method: str, folds=range(5)) -> dict:
    """Mean over folds of a method of the main benchmark (library default calibration; ConSE by its own rule).

    In fold k the held-out classes get their *new-class* descriptors, the others their seen-class ones.
    """
    per_fold = []
    for k in folds:
        held = fold_classes(k)
        per_fold.append(run_any(data, held, fold_matrix(seen_a, new_a, held), make_injector(method)))
    return {key: float(np.mean([f[key] for f in per_fold])) for key in per_fold[0]}


def markdown(results: dict[str, dict[str, dict[str, float]]], folds: list[int]) -> str:
    lines = []
    for method, table in results.items():
        lines += [
            f"### {method} (tf_efficientnet_lite0, mean over folds {folds} of 200 held-out classes)",
            "",
            "| descriptor | ZSL | S | U | H | row cos (image-free) | fit s |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in table.items():
            lines.append(
                f"| {name} | {r['zsl']:.1f} | {r['seen']:.1f} | {r['unseen']:.1f} | {r['h']:.1f} | {r['cosine']:.3f} "
                f"| {r['fit_seconds']:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


RIDGE = "ridge probe (lambda=1), library default calibration"  # the library's RidgeInjector(alpha=1)
ICIS = "ICIS (library defaults), library default calibration"
SMO = "VGSE-SMO (the strongest baseline), library default calibration"


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.descriptors") -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="ridge on these variants only (default: all)")
    parser.add_argument("--icis", nargs="*", default=None, help="also run ICIS on these variants (default: key ones)")
    parser.add_argument("--smo", nargs="*", default=None, help="also run VGSE-SMO on these variants")
    parser.add_argument(
        "--methods", nargs="*", default=None, help="also run these methods of benchmarks.run (ICIS and all baselines)"
    )
    parser.add_argument(
        "--methods-on", nargs="*", default=["minilm/name+definition"], help="the variants --methods run on"
    )
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3, 4], help="folds to average")
    parser.add_argument("--out", default="descriptors", help="run name in benchmarks/results/descriptors")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is much faster on a busy host)")
    args = parser.parse_args(argv)
    command = command_line(prog, argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    data = head_data("tf_efficientnet_lite0")
    all_variants = variants()
    results: dict[str, dict[str, dict[str, float]]] = {}
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    plan = [(RIDGE, "ridge", name) for name in (all_variants if args.only is None else args.only)]
    if args.icis is not None:
        key = args.icis or ["minilm/photo", "minilm/name+definition", "minilm/name+definition + glove/name"]
        plan += [(ICIS, "icis", name) for name in key]
    if args.smo is not None:
        plan += [(SMO, "vgse-smo", name) for name in args.smo or ["minilm/photo", "minilm/name+definition"]]
    for method in args.methods or []:
        plan += [(f"{method}, library default calibration", method, name) for name in args.methods_on]
    for table, method, name in plan:
        start = time.perf_counter()
        if name not in matrices:
            matrices[name] = all_variants[name]()
        r = evaluate(data, *matrices[name], method, folds=args.folds)
        results.setdefault(table, {})[name] = r
        short = {k: round(v, 3) for k, v in r.items()}
        print(f"{method:5s} {name:55s} {short} ({time.perf_counter() - start:.0f}s)", flush=True)
        # Recorded after every variant: a long run that is stopped keeps what it measured.
        numbers = {"folds": args.folds, **results}
        record(STUDY, args.out, numbers, markdown(results, args.folds), command, title="Which descriptors?")
    print(markdown(results, args.folds))


if __name__ == "__main__":
    main()
