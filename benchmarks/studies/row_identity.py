"""Rows ``inject()`` gives with every default on a fixed lite0 fold: the check that a refactor changed nothing.

Fold 0's 200 classes are removed from lite0's head and injected back by name (library defaults, seed 0), then 10
of them are injected twice with seed 1 (the second call reads the calibration's cached choice). ``--save FILE``
writes the rows and provenance; ``--compare FILE`` checks them against a saved file, bit for bit.

    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.row_identity --save before.safetensors
    ... change the code ...
    HF_HUB_OFFLINE=1 .venv/bin/python -m benchmarks.studies.row_identity --compare before.safetensors
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence

import torch

from benchmarks.harness.data import fold_classes, load_model
from benchmarks.harness.results import study_parser
from classifier_injection import InjectionConfig, find_head, inject
from classifier_injection.descriptors import seen_class_names
from classifier_injection.serialization import atomic_save_safetensors, read_safetensors


def without_classes(model: torch.nn.Module, classes: Sequence[int]) -> torch.nn.Module:
    """``model`` with the head rows of ``classes`` removed (as if it had never been trained on them)."""
    head = find_head(model)
    names = seen_class_names(model, head.num_classes)
    keep = [i for i in range(head.num_classes) if i not in set(classes)]
    layer = head.layer(model)
    reduced = torch.nn.Linear(layer.in_features, len(keep))
    with torch.no_grad():
        reduced.weight.copy_(layer.weight[keep])
        reduced.bias.copy_(layer.bias[keep])
    model.classifier = reduced
    model.num_classes = len(keep)
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": len(keep), "label_names": [names[i] for i in keep]}
    return model.eval()


def injected_rows() -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The rows and provenance of the three injections (a private cache folder: nothing is read from earlier runs)."""
    os.environ["CLASSIFIER_INJECTION_CACHE"] = tempfile.mkdtemp(prefix="row-identity-")
    original = load_model("tf_efficientnet_lite0")
    names = seen_class_names(original, 1000)
    held = [int(i) for i in fold_classes(0)]
    model = without_classes(original, held)
    config = InjectionConfig(allow_existing=True)  # ImageNet has a few names twice ("crane", "maillot")
    calls = {"fold0": ([names[i] for i in held], 0), "ten_first": ([names[i] for i in held[:10]], 1)}
    calls["ten_cached"] = calls["ten_first"]
    tensors, provenance = {}, {}
    for tag, (new, seed) in calls.items():
        out = inject(model, new, config, seed=seed)
        tensors[tag] = find_head(out).rows(out)[model.num_classes :].contiguous()
        record = dict(out.classifier_injection["injections"][-1])
        record.pop("seconds")
        provenance[tag] = record
    return tensors, provenance


def main(argv: Sequence[str] | None = None, prog: str = "benchmarks.studies.row_identity") -> None:
    parser = study_parser(prog, __doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="FILE", help="write the rows and provenance (safetensors)")
    group.add_argument("--compare", metavar="FILE", help="compare with a file written by --save")
    args = parser.parse_args(argv)
    tensors, provenance = injected_rows()
    if args.save:
        atomic_save_safetensors(tensors, args.save, {"provenance": json.dumps(provenance, default=str)})
        print(f"saved {sorted(tensors)} to {args.save}")
        return
    reference, metadata = read_safetensors(args.compare)
    before = json.loads(metadata["provenance"])
    identical = True
    for tag, rows in tensors.items():
        same = torch.equal(rows, reference[tag])
        changed = sorted(
            k
            for k in before[tag]
            if json.dumps(before[tag][k], default=str) != json.dumps(provenance[tag].get(k), default=str)
        )
        print(f"{tag}: rows {'bit-identical' if same else 'DIFFER'}; provenance keys that changed: {changed or 'none'}")
        identical &= same
    sys.exit(0 if identical else 1)


if __name__ == "__main__":
    main()
