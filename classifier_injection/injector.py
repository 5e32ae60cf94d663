"""The interface every injector (ICIS and the baselines) implements.

An injector learns, from the seen classes of one head, a map from class descriptors to classifier rows,
and predicts rows for new classes from their descriptors alone.

Shapes: ``seen_descriptors [S, d]``, ``seen_rows [S, D + 1]`` (``[W | b]``), ``new_descriptors [U, d]``;
:meth:`Injector.predict` returns ``[U, D + 1]``. All float32 on the CPU.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = ["Injector", "check_fit_inputs", "top_cosines"]


@runtime_checkable
class Injector(Protocol):
    """Fit on the seen rows of a head, predict rows for new classes."""

    #: Short method name recorded in provenance (e.g. ``"icis"``, ``"ridge"``).
    name: str

    def fit(
        self,
        seen_descriptors: torch.Tensor,
        seen_rows: torch.Tensor,
        new_descriptors: torch.Tensor | None = None,
    ) -> Injector:
        """Learn from the seen classes. ``new_descriptors`` may be used transductively (no rows for them)."""
        ...

    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Rows ``[W | b]`` for classes described by ``descriptors``."""
        ...

    def hparams(self) -> dict:
        """JSON-able hyper-parameters, recorded in the provenance of injected models."""
        ...


# Optional: ``cacheable = True`` on an injector whose fit is fixed by its class, ``hparams()`` and the seed lets
# ``inject()`` reuse the calibration's simulation for the same head (classifier_injection.calibration.cache);
# ``fit_state()`` / ``load_fit_state()`` let it keep the fit itself (classifier_injection.cache.FitCache), and
# ``reads_new_descriptors = False`` says the fit ignores the new classes' descriptors, so both are kept per head.


def check_fit_inputs(
    seen_descriptors: torch.Tensor, seen_rows: torch.Tensor, new_descriptors: torch.Tensor | None = None
) -> None:
    """Validate the shapes every injector expects, with errors that say what is wrong."""
    if seen_descriptors.dim() != 2 or seen_rows.dim() != 2:
        raise ValueError(
            f"seen_descriptors and seen_rows must be 2-D, got {tuple(seen_descriptors.shape)} and "
            f"{tuple(seen_rows.shape)}"
        )
    if seen_descriptors.shape[0] != seen_rows.shape[0]:
        raise ValueError(
            f"seen_descriptors has {seen_descriptors.shape[0]} classes but seen_rows has {seen_rows.shape[0]}: "
            "one descriptor per row"
        )
    if seen_rows.shape[0] < 2:
        raise ValueError(f"need at least 2 seen classes to learn from, got {seen_rows.shape[0]}")
    if new_descriptors is not None and (
        new_descriptors.dim() != 2 or new_descriptors.shape[1] != seen_descriptors.shape[1]
    ):
        raise ValueError(
            f"new_descriptors must be [U, {seen_descriptors.shape[1]}] like seen_descriptors, got "
            f"{tuple(new_descriptors.shape)}"
        )
    for name, t in (("seen_descriptors", seen_descriptors), ("seen_rows", seen_rows)):
        if not all(torch.isfinite(block).all() for block in t.split(4096)):  # in blocks: a 22k-class head is large
            raise ValueError(f"{name} contains NaN or infinite values")


def top_cosines(
    keys: torch.Tensor, queries: torch.Tensor, k: int, chunk: int = 256, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest cosines ``[n, k]`` between each query and the rows of ``keys``, and their indices.

    A chunk of queries at a time against the keys as they are (scaled by their inverse norms), in buffers
    allocated once: a normalised copy of a 22k-class head would outweigh the head, and a fresh block of scores per
    chunk leaves the allocator holding hundreds of MiB after 10,000 queries. ``exclude`` (bool ``[len(keys)]``):
    keys never returned.
    """
    inverse_norms = keys.norm(dim=1).clamp_min(1e-12).reciprocal()
    k = min(k, len(keys) if exclude is None else int((~exclude).sum()))
    excluded = exclude.to(keys.device)[None] if exclude is not None else None
    values = keys.new_empty(len(queries), k)
    indices = torch.empty(len(queries), k, dtype=torch.long, device=keys.device)
    scores = keys.new_empty(min(chunk, len(queries)), len(keys))
    for start in range(0, len(queries), chunk):
        part = F.normalize(queries[start : start + chunk].to(keys), dim=1)
        block = scores[: len(part)]
        torch.matmul(part, keys.T, out=block).mul_(inverse_norms)
        if excluded is not None:
            block.masked_fill_(excluded, float("-inf"))
        torch.topk(block, k, dim=1, out=(values[start : start + chunk], indices[start : start + chunk]))
    return values, indices
