"""ICIS: Image-free Classifier Injection with Semantics (Christensen et al., ICCV 2023).

Two autoencoders share one latent space: one over class descriptors ``a`` (text embeddings), one over
classifier rows ``r = [w | b]``. They are trained on the seen classes of the head with four losses,
all weighted 1, ``d(x, y) = 1 - cos(x, y)`` per row (MSE as the ablation):

* A->A: ``d(dec_A(enc_A(a)), a)`` over seen classes and, optionally, the descriptors of the new classes
  (they have no row, so only this term sees them; the paper's ``include_unseen``),
* W->W: ``d(dec_W(enc_W(r)), r)``, seen classes,
* A->W and W->A (cross-reconstruction): ``d(dec_W(enc_A(a)), r)``, ``d(dec_A(enc_W(r)), a)``, seen classes.

A new class gets the row ``dec_W(enc_A(a))``. The cosine loss leaves the norm of predicted rows free;
:mod:`classifier_injection.calibration` sets it afterwards.

``dec_W`` is a linear layer in the paper. The library default (``ICISConfig.row_decoder="mixture"``) decodes a
latent into softmax weights over the seen rows and returns their weighted sum: a predicted row is a blend of
rows the head itself learned (a new breed of cat mixes the rows of the cats it knows), as VGSE-SMO builds rows,
but with the mixture learned by the two autoencoders. Why these defaults: ``docs/decisions.md``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .injector import check_fit_inputs

__all__ = ["ICISConfig", "ICISInjector", "ICISModel"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ICISConfig:
    """Hyper-parameters of ICIS.

    The defaults are the library's (chosen on held-out *seen* classes); use
    :meth:`paper` for the settings of the official code (batch 16, lr 1e-5, slope early stopping).

    Attributes:
        latent_dim: width ``E`` of the shared latent space (2048 in the paper).
        lr: Adam learning rate.
        batch_size: seen classes per step.
        max_epochs: upper bound on epochs.
        min_epochs: epochs before early stopping may trigger (20 in the paper).
        early_stop_slope: stop when ``-(mean(last 10 losses) - mean(previous 10)) / 10`` stays below this
            for ``early_stop_patience`` epochs in a row (0.002 and 5 in the paper). ``0`` disables it.
        loss: ``"cosine"`` (the paper) or ``"mse"`` (ablation).
        cross_reconstruction: use the A->W and W->A terms (ablation: ``False``).
        include_new_descriptors: use the new classes' descriptors in the A->A term.
        center: subtract the seen classes' mean descriptor and mean row before training. Rows of a real head
            share a large common component; without centering the cosine loss is mostly spent on it. The cosine
            loss leaves the norm of a prediction free, so a centred prediction is rescaled to the mean norm of
            the centred seen rows before the mean row is added back. ``False`` in :meth:`paper`.
        weight_decay: Adam weight decay.
        row_decoder: ``"mixture"`` (default): ``dec_W(z) = softmax(U z + c) @ R_seen``, a convex combination of
            the seen rows ``R_seen`` (kept in the model as a buffer); ``"linear"``: ``dec_W(z) = V z + c``
            (the paper's).
        dropout: dropout on both latent codes during training (0 in the paper).
    """

    latent_dim: int = 256
    lr: float = 3e-3
    batch_size: int = 256
    max_epochs: int = 1000
    min_epochs: int = 20
    early_stop_slope: float = 0.002
    early_stop_patience: int = 5
    loss: Literal["cosine", "mse"] = "cosine"
    cross_reconstruction: bool = True
    include_new_descriptors: bool = True
    weight_decay: float = 0.0
    center: bool = False
    row_decoder: Literal["mixture", "linear"] = "mixture"
    dropout: float = 0.3

    @classmethod
    def paper(cls, **overrides) -> ICISConfig:
        """The settings of the official ICIS code: batch 16, lr 1e-5, latent 2048, up to 1000 epochs, slope stop."""
        paper = cls(lr=1e-5, batch_size=16, latent_dim=2048, center=False, row_decoder="linear", dropout=0.0)
        return replace(paper, **overrides)

    def __post_init__(self) -> None:
        if self.loss not in ("cosine", "mse"):
            raise ValueError(f"loss must be 'cosine' or 'mse', got {self.loss!r}")
        for name in ("latent_dim", "batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.row_decoder not in ("mixture", "linear"):
            raise ValueError(f"row_decoder must be 'mixture' or 'linear', got {self.row_decoder!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ICISConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ICIS config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**data)


class _MixtureDecoder(nn.Module):
    """``z -> softmax(U z + c) @ basis``: a convex combination of fixed rows ``basis [S, dim]``."""

    def __init__(self, latent_dim: int, basis: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Linear(latent_dim, basis.shape[0])
        self.register_buffer("basis", basis)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(z), dim=-1) @ self.basis


class _AutoEncoder(nn.Module):
    def __init__(self, dim: int, latent_dim: int, dropout: float = 0.0, basis: torch.Tensor | None = None) -> None:
        super().__init__()
        # Dropout has no parameters: files saved with any dropout share one state-dict layout.
        self.encoder = nn.Sequential(nn.Linear(dim, latent_dim), nn.ReLU(), nn.Dropout(dropout))
        self.decoder = nn.Linear(latent_dim, dim) if basis is None else _MixtureDecoder(latent_dim, basis)


class ICISModel(nn.Module):
    """The two autoencoders. ``forward(a)`` predicts rows from descriptors.

    Args:
        descriptor_dim: width of the descriptors.
        row_dim: width of the rows ``[w | b]``.
        latent_dim: width of the shared latent space.
        basis: for the mixture row decoder, the rows ``[S, row_dim]`` it mixes (the seen rows, in the frame the
            model is trained in); ``None`` for the paper's linear decoder.
        dropout: dropout on the latent codes (active in ``train()`` mode only).
    """

    def __init__(
        self,
        descriptor_dim: int,
        row_dim: int,
        latent_dim: int = 2048,
        *,
        basis: torch.Tensor | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if basis is not None and (basis.dim() != 2 or basis.shape[1] != row_dim or len(basis) < 1):
            raise ValueError(f"basis must be [S >= 1, {row_dim}] (rows to mix), got {tuple(basis.shape)}")
        self.descriptor_ae = _AutoEncoder(descriptor_dim, latent_dim, dropout)
        self.weight_ae = _AutoEncoder(row_dim, latent_dim, dropout, basis)
        # Offsets removed before encoding / added after decoding, and the norm given to centred predictions
        # (zeros unless ICISConfig.center: then forward() is the plain decode of the paper).
        self.register_buffer("descriptor_mean", torch.zeros(descriptor_dim))
        self.register_buffer("row_mean", torch.zeros(row_dim))
        self.register_buffer("centered_norm", torch.zeros(()))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        rows = self.weight_ae.decoder(self.descriptor_ae.encoder(descriptors - self.descriptor_mean))
        if self.centered_norm > 0:
            rows = F.normalize(rows, dim=1) * self.centered_norm + self.row_mean
        return rows

    def losses(
        self,
        descriptors: torch.Tensor,
        rows: torch.Tensor,
        extra_descriptors: torch.Tensor | None,
        distance,
        cross_reconstruction: bool,
    ) -> torch.Tensor:
        z_a = self.descriptor_ae.encoder(descriptors)
        z_w = self.weight_ae.encoder(rows)
        a_for_aa = descriptors if extra_descriptors is None else torch.cat([descriptors, extra_descriptors])
        z_aa = z_a if extra_descriptors is None else torch.cat([z_a, self.descriptor_ae.encoder(extra_descriptors)])
        loss = distance(self.descriptor_ae.decoder(z_aa), a_for_aa) + distance(self.weight_ae.decoder(z_w), rows)
        if cross_reconstruction:
            loss = (
                loss
                + distance(self.weight_ae.decoder(z_a), rows)
                + distance(self.descriptor_ae.decoder(z_w), descriptors)
            )
        return loss


def _cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(x, y, dim=1)).mean()


def _mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x, y)


def _slope_says_stop(history: list[float]) -> float | None:
    """The paper's slope: ``-(mean(last 10) - mean(previous 10)) / 10``, or None before 20 epochs."""
    if len(history) < 20:
        return None
    last, previous = history[-10:], history[-20:-10]
    return -(sum(last) / 10 - sum(previous) / 10) / 10


class ICISInjector:
    """ICIS as an :class:`~classifier_injection.injector.Injector`.

    Example:
        >>> injector = ICISInjector(seed=0).fit(seen_descriptors, seen_rows, new_descriptors)
        >>> new_rows = injector.predict(new_descriptors)
    """

    name = "icis"
    #: Its fit is fixed by ``hparams()`` (config and seed): calibration choices may be cached.
    cacheable = True

    def __init__(self, config: ICISConfig | None = None, *, seed: int = 0, progress: bool = False) -> None:
        self.config = config or ICISConfig()
        self.seed = seed
        self.progress = progress
        self.model: ICISModel | None = None
        self.history: list[float] = []
        self.fingerprint: str | None = None

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    def hparams(self) -> dict:
        return {**self.config.to_dict(), "seed": self.seed, "epochs_trained": len(self.history)}

    def fit(
        self,
        seen_descriptors: torch.Tensor,
        seen_rows: torch.Tensor,
        new_descriptors: torch.Tensor | None = None,
    ) -> ICISInjector:
        check_fit_inputs(seen_descriptors, seen_rows, new_descriptors)
        cfg = self.config
        a = seen_descriptors.detach().float().cpu()
        r = seen_rows.detach().float().cpu()
        a_new = None
        if cfg.include_new_descriptors and new_descriptors is not None and len(new_descriptors):
            a_new = new_descriptors.detach().float().cpu()
        descriptor_mean = a.mean(0) if cfg.center else torch.zeros(a.shape[1])
        row_mean = r.mean(0) if cfg.center else torch.zeros(r.shape[1])
        a, r = a - descriptor_mean, r - row_mean
        if a_new is not None:
            a_new = a_new - descriptor_mean

        # One forked RNG for the whole fit: initialisation and dropout are seeded, the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            basis = r.clone() if cfg.row_decoder == "mixture" else None
            model = ICISModel(a.shape[1], r.shape[1], cfg.latent_dim, basis=basis, dropout=cfg.dropout)
            model.descriptor_mean.copy_(descriptor_mean)
            model.row_mean.copy_(row_mean)
            if cfg.center:
                model.centered_norm.fill_(r.norm(dim=1).mean())
            self.history = self._train(model, a, r, a_new)
        _logger.info("ICIS trained %d epochs, final loss %.4f", len(self.history), self.history[-1])
        model.eval()
        self.model = model
        return self

    def _train(self, model: ICISModel, a: torch.Tensor, r: torch.Tensor, a_new: torch.Tensor | None) -> list[float]:
        """Mini-batch Adam on the four losses until the slope rule stops it; returns the loss per epoch."""
        cfg = self.config
        distance = _cosine_distance if cfg.loss == "cosine" else _mse
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        generator = torch.Generator().manual_seed(self.seed)
        n = a.shape[0]
        batch = min(cfg.batch_size, n)
        history: list[float] = []
        flat_epochs = 0
        bar = tqdm(range(cfg.max_epochs), desc="ICIS", unit="epoch", disable=not self.progress, leave=False)
        model.train()
        for epoch in bar:
            order = torch.randperm(n, generator=generator)
            new_order = torch.randperm(len(a_new), generator=generator) if a_new is not None else None
            total, steps = 0.0, 0
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                extra = None
                if new_order is not None:
                    # Cycle the (usually few) new descriptors through the steps of the epoch.
                    k = min(len(idx), len(new_order))
                    offset = (steps * k) % len(new_order)
                    extra = a_new[new_order.roll(-offset)[:k]]
                loss = model.losses(a[idx], r[idx], extra, distance, cfg.cross_reconstruction)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item()
                steps += 1
            history.append(total / steps)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            slope = _slope_says_stop(history)
            if cfg.early_stop_slope > 0 and slope is not None and epoch + 1 >= cfg.min_epochs:
                flat_epochs = flat_epochs + 1 if slope < cfg.early_stop_slope else 0
                if flat_epochs >= cfg.early_stop_patience:
                    break
        bar.close()
        return history

    @torch.no_grad()
    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("ICISInjector.predict() called before fit() or load()")
        expected = self.model.descriptor_ae.encoder[0].in_features
        if descriptors.dim() != 2 or descriptors.shape[1] != expected:
            raise ValueError(
                f"descriptors must be [n, {expected}] (the width this injector was trained on), got "
                f"{tuple(descriptors.shape)}: use the same embedder as for training"
            )
        return self.model(descriptors.detach().float().cpu())

    def _basis_rows(self) -> int:
        decoder = self.model.weight_ae.decoder if self.model is not None else None
        return len(decoder.basis) if isinstance(decoder, _MixtureDecoder) else 0

    def save(self, path: str, *, overwrite: bool = False) -> None:
        """Save the trained injector as one safetensors file (weights + JSON config in its metadata).

        Written atomically; an existing ``path`` is replaced only if ``overwrite``.
        """
        from .serialization import atomic_save_safetensors

        if self.model is None:
            raise RuntimeError("nothing to save: call fit() first")
        metadata = {
            "format": "classifier_injection.icis",
            "config": json.dumps(self.config.to_dict()),
            "seed": str(self.seed),
            "history": json.dumps(self.history),
            "fingerprint": self.fingerprint or "",
            "descriptor_dim": str(self.model.descriptor_ae.encoder[0].in_features),
            "row_dim": str(self.model.weight_ae.encoder[0].in_features),
            "basis_rows": str(self._basis_rows()),
        }
        atomic_save_safetensors(self.model.state_dict(), path, metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str) -> ICISInjector:
        """Load an injector written by :meth:`save` (safetensors only: no pickle)."""
        from .serialization import check_state_dict, read_safetensors

        tensors, metadata = read_safetensors(path)
        if metadata.get("format") != "classifier_injection.icis":
            raise ValueError(f"{path} is not an ICIS injector file (metadata format={metadata.get('format')!r})")
        try:
            stored = json.loads(metadata["config"])
            if isinstance(stored, dict) and "row_decoder" not in stored:  # files from before the option existed
                stored = {**stored, "row_decoder": "linear", "dropout": 0.0}
            config = ICISConfig.from_dict(stored)
            descriptor_dim, row_dim = int(metadata["descriptor_dim"]), int(metadata["row_dim"])
            injector = cls(config, seed=int(metadata["seed"]))
            injector.history = [float(x) for x in json.loads(metadata["history"])]
            # Sizes come from an untrusted file: check them against its tensors on the meta device first.
            basis_rows = int(metadata.get("basis_rows", "0"))
            if (basis_rows > 0) != (config.row_decoder == "mixture"):
                raise ValueError(f"basis_rows={basis_rows} does not match row_decoder={config.row_decoder!r}")
            with torch.device("meta"):
                basis = torch.empty(basis_rows, row_dim) if basis_rows else None
                skeleton = ICISModel(descriptor_dim, row_dim, config.latent_dim, basis=basis)
        except (KeyError, ValueError, TypeError, RecursionError, RuntimeError) as err:
            raise ValueError(f"{path}: invalid ICIS injector metadata ({err})") from err
        check_state_dict(tensors, skeleton.state_dict(), path, parameters=set(skeleton.state_dict()))
        basis = torch.empty(basis_rows, row_dim) if basis_rows else None
        model = ICISModel(descriptor_dim, row_dim, config.latent_dim, basis=basis)
        model.load_state_dict(tensors, strict=True)
        model.eval()
        injector.model = model
        injector.fingerprint = metadata.get("fingerprint") or None
        return injector
