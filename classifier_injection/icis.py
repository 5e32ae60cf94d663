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
import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .injector import check_fit_inputs, top_cosines

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
        row_encoder: train the row encoder, i.e. use the W->W and W->A terms (ablation: ``False``, a fit about twice
            as fast; a new row ``dec_W(enc_A(a))`` never passes through the row encoder).
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
        mixture_top_k: on heads of more than ``mixture_dense_up_to`` seen classes, the mixture decoder blends only
            the ``k`` seen rows whose descriptors are closest to the class's (``None``: always all of them), so a
            step's cost does not grow with the head.
        mixture_dense_up_to: heads of up to this many seen classes blend all their rows.
        classes_per_epoch: an epoch visits at most this many seen classes, drawn anew each epoch (``None``: all),
            so that training time does not grow with the head.
        exclude_own_row: train the mixture decoder to rebuild each seen row from the *other* seen rows, as it must
            for a new class, whose row is never in the basis (ablation; less precise new rows).
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
    row_encoder: bool = True
    include_new_descriptors: bool = True
    weight_decay: float = 0.0
    center: bool = False
    row_decoder: Literal["mixture", "linear"] = "mixture"
    dropout: float = 0.3
    mixture_top_k: int | None = 64
    mixture_dense_up_to: int = 2048
    classes_per_epoch: int | None = 1024
    exclude_own_row: bool = False

    @classmethod
    def paper(cls, **overrides) -> ICISConfig:
        """The settings of the official ICIS code: batch 16, lr 1e-5, latent 2048, up to 1000 epochs, slope stop."""
        paper = cls(
            lr=1e-5,
            batch_size=16,
            latent_dim=2048,
            center=False,
            row_decoder="linear",
            dropout=0.0,
            mixture_top_k=None,
            classes_per_epoch=None,
        )
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
        if not (self.cross_reconstruction or self.row_encoder):
            raise ValueError(
                "nothing would train the row decoder: set cross_reconstruction=True (A->W) or row_encoder=True (W->W)"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.mixture_dense_up_to < 0:
            raise ValueError(f"mixture_dense_up_to must be >= 0, got {self.mixture_dense_up_to}")
        for name in ("mixture_top_k", "classes_per_epoch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")

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
    """``z -> softmax(U z + c) @ basis``: a convex combination of fixed rows ``basis [S, dim]``.

    With ``candidates [B, k]`` (indices into the basis) each ``z`` blends only its own ``k`` rows.
    """

    def __init__(self, latent_dim: int, basis: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Linear(latent_dim, basis.shape[0])
        self.register_buffer("basis", basis)

    def weights(
        self,
        z: torch.Tensor,
        candidates: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        left_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mixture weights over each ``z``'s candidate rows ``[B, k]`` (all rows ``[B, S]`` without
        ``candidates``), none on basis row ``exclude [B]`` nor, without ``candidates``, on the rows ``left_out``
        (bool ``[S]``)."""
        if candidates is None:
            logits = self.logits(z)
            if left_out is not None:
                logits = logits.masked_fill(left_out, float("-inf"))
            return torch.softmax(logits if exclude is None else logits.scatter(1, exclude[:, None], -torch.inf), 1)
        logits = _SparseLinear.apply(z, candidates, self.logits.weight, self.logits.bias)
        if exclude is not None:
            logits = logits.masked_fill(candidates == exclude[:, None], float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(
        self,
        z: torch.Tensor,
        candidates: torch.Tensor | None = None,
        exclude: torch.Tensor | None = None,
        left_out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Blend the basis rows for each ``z`` (over its ``candidates`` if given), never basis row ``exclude`` nor,
        without ``candidates``, the rows ``left_out``."""
        if candidates is not None:
            return _SparseBlend.apply(self.weights(z, candidates, exclude), candidates, self.basis)
        return self.weights(z, exclude=exclude, left_out=left_out) @ self.basis


class _SparseBlend(torch.autograd.Function):
    """``x_b = sum_j w_bj table[c_bj]`` for weights ``w [B, k]`` on candidates ``c [B, k]``; the table gets no
    gradient (a fixed basis).

    Neither direction gathers the ``B x k`` rows, which would outweigh a 22k-class head.
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, candidates: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(candidates, table)
        return F.embedding_bag(candidates, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        candidates, table = ctx.saved_tensors
        return _sampled_dot(grad, table, candidates), None, None


class _SparseLinear(torch.autograd.Function):
    """``s_bj = x_b . weight[c_bj] + bias[c_bj]`` for ``x [B, E]`` on candidates ``c [B, k]``: a linear layer scored on
    the candidates only, with dense gradients for its weight and bias (as the optimiser keeps them).

    Both gradients are products with the transposed pattern, built once per step as a CSR matrix: a transposed CSR
    matrix is converted on every product, and an embedding's backward sorts the candidates again.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, candidates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, candidates, weight)
        return _sampled_dot(x, weight, candidates) + bias[candidates]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None, torch.Tensor | None]:
        x, candidates, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(candidates, weight, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            transposed = _transposed_pattern(grad, candidates, len(weight))
            grad_weight = transposed @ x if ctx.needs_input_grad[2] else None
            grad_bias = (transposed @ x.new_ones(len(x), 1)).squeeze(1) if ctx.needs_input_grad[3] else None
        return grad_x, None, grad_weight, grad_bias


def _pattern(values: torch.Tensor, candidates: torch.Tensor, columns: int) -> torch.Tensor:
    """The sparse ``[B, columns]`` matrix holding ``values [B, k]`` at the columns ``candidates [B, k]``."""
    num, k = candidates.shape
    rows = torch.arange(0, num * k + 1, k, device=candidates.device)
    return _csr(rows, candidates.reshape(-1), values.reshape(-1), (num, columns))


def _transposed_pattern(values: torch.Tensor, candidates: torch.Tensor, columns: int) -> torch.Tensor:
    """The transpose of :func:`_pattern` ``[columns, B]``, built as a CSR matrix of its own."""
    flat = candidates.reshape(-1)
    order = torch.argsort(flat, stable=True)
    rows = torch.zeros(columns + 1, dtype=torch.long, device=flat.device)
    torch.cumsum(torch.bincount(flat, minlength=columns), 0, out=rows[1:])
    return _csr(rows, order // candidates.shape[1], values.reshape(-1)[order], (columns, len(candidates)))


def _csr(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A CSR matrix from parts built valid by the caller (no invariants check, no beta warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        return torch.sparse_csr_tensor(rows, columns, values, size, check_invariants=False)


def _sampled_dot(x: torch.Tensor, table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``x_b . table[c_bj]`` ``[B, k]``: the product ``x @ table.T`` computed on the candidates only."""
    pattern = _pattern(x.new_zeros(candidates.shape), candidates, len(table))
    return torch.sparse.sampled_addmm(pattern, x, table.T, beta=0.0).values().reshape(candidates.shape)


@dataclass(frozen=True)
class _BlendTargets:
    """What a row loss needs of each seen class ``i`` when every class blends the whole basis, so blends are
    never built: ``gram = basis . basis'`` ``[S, S]``, ``inner``: ``basis . r_i`` per class (the Gram's rows, as the
    rows are the basis), ``sq_norm``: ``|r_i|^2``.

    A blend ``x = w . basis`` then has ``x . r_i = w . inner`` and ``|x|^2 = w' gram w``: a step costs ``S^2`` per
    class instead of ``2 S x row width``.
    """

    inner: torch.Tensor
    gram: torch.Tensor
    sq_norm: torch.Tensor

    @classmethod
    @torch.no_grad()
    def dense(cls, basis: torch.Tensor) -> _BlendTargets:
        """Targets of the basis' own rows, each blending the whole basis."""
        gram = basis @ basis.T
        return cls(gram, gram, gram.diagonal().clone())

    def select(self, idx: torch.Tensor) -> _BlendTargets:
        """The targets of the seen classes ``idx`` (one batch)."""
        return _BlendTargets(self.inner[idx], self.gram, self.sq_norm[idx])

    def distance(self, weights: torch.Tensor, loss: str, row_dim: int) -> torch.Tensor:
        """The row loss of the blends with ``weights [B, S]`` against these targets' rows."""
        dot = (weights * self.inner).sum(1)
        sq = _QuadraticForm.apply(weights, self.gram).clamp_min(0)
        if loss == "mse":
            return (sq - 2 * dot + self.sq_norm).sum() / (len(weights) * row_dim)
        return (1 - dot / (sq.sqrt() * self.sq_norm.sqrt()).clamp_min(1e-8)).mean()


class _QuadraticForm(torch.autograd.Function):
    """``w' G w`` per row of ``w [B, S]`` for a symmetric ``G [S, S]``: its gradient reuses ``w G``."""

    @staticmethod
    def forward(ctx, weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
        product = weights @ gram
        ctx.save_for_backward(product)
        return (product * weights).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (product,) = ctx.saved_tensors
        return 2 * grad[:, None] * product, None


class _Dropout(nn.Module):
    """Inverted dropout with its mask drawn by ``rand``: on the CPU ``bernoulli_`` costs a tenth of an ICIS step."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1 - self.p
        return x * (torch.rand_like(x) < keep).to(x.dtype).div_(keep)


class _AutoEncoder(nn.Module):
    def __init__(self, dim: int, latent_dim: int, dropout: float = 0.0, basis: torch.Tensor | None = None) -> None:
        super().__init__()
        # Dropout has no parameters: files saved with any dropout share one state-dict layout.
        self.encoder = nn.Sequential(nn.Linear(dim, latent_dim), nn.ReLU(), _Dropout(dropout))
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
        top_k: with a basis, blend only the ``top_k`` rows whose descriptors are nearest (``None``: all rows).
        basis_keys: the descriptors ``[S, descriptor_dim]`` of the basis rows; needed with ``top_k``.
    """

    def __init__(
        self,
        descriptor_dim: int,
        row_dim: int,
        latent_dim: int = 2048,
        *,
        basis: torch.Tensor | None = None,
        dropout: float = 0.0,
        top_k: int | None = None,
        basis_keys: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if basis is not None and (basis.dim() != 2 or basis.shape[1] != row_dim or len(basis) < 1):
            raise ValueError(f"basis must be [S >= 1, {row_dim}] (rows to mix), got {tuple(basis.shape)}")
        self.descriptor_ae = _AutoEncoder(descriptor_dim, latent_dim, dropout)
        self.weight_ae = _AutoEncoder(row_dim, latent_dim, dropout, basis)
        self.top_k = top_k if basis is not None and top_k is not None and top_k < len(basis) else None
        if self.top_k is not None:
            if basis_keys is None or tuple(basis_keys.shape) != (len(basis), descriptor_dim):
                raise ValueError(f"top_k needs basis_keys [{len(basis)}, {descriptor_dim}] (the basis' descriptors)")
            self.register_buffer("basis_keys", basis_keys)  # not normalised: a 22k-class head's keys are not copied
        # Offsets removed before encoding / added after decoding, and the norm given to centred predictions
        # (zeros unless ICISConfig.center: then forward() is the plain decode of the paper).
        self.register_buffer("descriptor_mean", torch.zeros(descriptor_dim))
        self.register_buffer("row_mean", torch.zeros(row_dim))
        self.register_buffer("centered_norm", torch.zeros(()))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def candidates(self, descriptors: torch.Tensor, left_out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Indices ``[n, k]`` of the basis rows each descriptor's mixture may blend (``None``: all of them but
        ``left_out``, bool ``[S]``)."""
        if self.top_k is None:  # set only with a basis, i.e. for the mixture decoder
            return None
        return top_cosines(self.basis_keys, descriptors, self.top_k, exclude=left_out)[1]

    def forward(self, descriptors: torch.Tensor, left_out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows for ``descriptors``; with ``left_out`` (bool ``[S]``, mixture decoder only) no blend uses those
        basis rows."""
        z = self.descriptor_ae.encoder(descriptors - self.descriptor_mean)
        decoder = self.weight_ae.decoder
        if isinstance(decoder, _MixtureDecoder):
            rows = decoder(z, self.candidates(descriptors, left_out), left_out=left_out)
        elif left_out is not None:
            raise ValueError("only the mixture row decoder blends seen rows that can be left out")
        else:
            rows = decoder(z)
        if self.centered_norm > 0:
            rows = F.normalize(rows, dim=1) * self.centered_norm + self.row_mean
        return rows

    def losses(
        self,
        descriptors: torch.Tensor,
        rows: torch.Tensor,
        extra_descriptors: torch.Tensor | None,
        loss: Literal["cosine", "mse"],
        cross_reconstruction: bool,
        candidates: torch.Tensor | None = None,
        targets: _BlendTargets | None = None,
        own: torch.Tensor | None = None,
        row_encoder: bool = True,
    ) -> torch.Tensor:
        """The summed losses of one batch.

        ``candidates [B, k]``: the basis rows each class's mixture may blend (``None``: all); ``targets``: score
        the mixture's blends of the whole basis without building them; ``own``: the batch's basis indices, which
        the mixture may not blend into its own row (``None``: it may); ``row_encoder``: include the W->W and W->A
        terms.
        """
        distance = _cosine_distance if loss == "cosine" else _mse
        z_a = self.descriptor_ae.encoder(descriptors)
        z_w = self.weight_ae.encoder(rows) if row_encoder else None
        a_for_aa = descriptors if extra_descriptors is None else torch.cat([descriptors, extra_descriptors])
        z_aa = z_a if extra_descriptors is None else torch.cat([z_a, self.descriptor_ae.encoder(extra_descriptors)])

        def row_losses(*codes: torch.Tensor) -> list[torch.Tensor]:
            decoder = self.weight_ae.decoder
            if targets is not None:
                return [targets.distance(decoder.weights(z, exclude=own), loss, rows.shape[1]) for z in codes]
            if candidates is not None:  # one sparse pass for all codes: the logits' dense gradient is made once
                n = len(codes)
                blends = decoder(torch.cat(codes), candidates.repeat(n, 1), None if own is None else own.repeat(n))
                return [distance(x, rows) for x in blends.chunk(n)]
            if isinstance(decoder, _MixtureDecoder):
                return [distance(decoder(z, exclude=own), rows) for z in codes]
            return [distance(decoder(z), rows) for z in codes]

        row = row_losses(*([z_w] if z_w is not None else []), *([z_a] if cross_reconstruction else []))
        total = distance(self.descriptor_ae.decoder(z_aa), a_for_aa) + row[0]
        if len(row) > 1:
            total = total + row[1]
        if cross_reconstruction and z_w is not None:
            total = total + distance(self.descriptor_ae.decoder(z_w), descriptors)
        return total


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

    def __init__(
        self,
        config: ICISConfig | None = None,
        *,
        seed: int = 0,
        progress: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config or ICISConfig()
        self.seed = seed
        self.progress = progress
        #: Where the fit runs (float32 maths); ``None``: the CPU. Predicted rows are always returned on the CPU.
        self.device = device
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
        device = torch.device(self.device if self.device is not None else "cpu")
        keys = seen_descriptors.detach().to(device, torch.float32)
        a = keys
        r = seen_rows.detach().to(device, torch.float32)
        a_new = None
        if cfg.include_new_descriptors and new_descriptors is not None and len(new_descriptors):
            a_new = new_descriptors.detach().to(device, torch.float32)
        descriptor_mean = a.mean(0) if cfg.center else torch.zeros(a.shape[1], device=device)
        row_mean = r.mean(0) if cfg.center else torch.zeros(r.shape[1], device=device)
        if cfg.center:  # subtracting zeros would only copy the head
            a, r = a - descriptor_mean, r - row_mean
            if a_new is not None:
                a_new = a_new - descriptor_mean

        # One forked RNG for the whole fit: initialisation and dropout are seeded, the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            mixture = cfg.row_decoder == "mixture"
            with torch.device("cpu"):  # initialised on the CPU, so that every device starts from the same weights
                model = ICISModel(
                    a.shape[1],
                    r.shape[1],
                    cfg.latent_dim,
                    basis=r.cpu() if mixture else None,  # the seen rows themselves: a head of 22k rows is not copied
                    dropout=cfg.dropout,
                    top_k=_top_k(cfg, len(r)) if mixture else None,
                    basis_keys=keys.cpu() if mixture else None,
                )
            model = model.to(device)
            model.descriptor_mean.copy_(descriptor_mean)
            model.row_mean.copy_(row_mean)
            if cfg.center:
                model.centered_norm.fill_(r.norm(dim=1).mean())
            self.history = self._train(model, a, r, a_new, model.candidates(keys))
        _logger.info("ICIS trained %d epochs, final loss %.4f", len(self.history), self.history[-1])
        model.eval()
        self.model = model
        return self

    def _train(
        self,
        model: ICISModel,
        a: torch.Tensor,
        r: torch.Tensor,
        a_new: torch.Tensor | None,
        candidates: torch.Tensor | None,
    ) -> list[float]:
        """Mini-batch Adam on the four losses until the slope rule stops it; returns the loss per epoch.

        ``candidates [S, k]``: the basis rows each seen class's mixture may blend (``None``: all).
        """
        targets = _blend_targets(model.weight_ae.decoder, r) if candidates is None else None
        cfg = self.config
        # The fused update is the fastest, and needs no temporaries the size of a large head's mixture logits.
        optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True
        )
        generator = torch.Generator().manual_seed(self.seed)
        n = a.shape[0]
        batch = min(cfg.batch_size, n)
        mixture_own = cfg.exclude_own_row and isinstance(model.weight_ae.decoder, _MixtureDecoder)
        history: list[float] = []
        flat_epochs = 0
        bar = tqdm(range(cfg.max_epochs), desc="ICIS", unit="epoch", disable=not self.progress, leave=False)
        model.train()
        for epoch in bar:
            order = torch.randperm(n, generator=generator)[: cfg.classes_per_epoch]
            new_order = torch.randperm(len(a_new), generator=generator) if a_new is not None else None
            total, steps = 0.0, 0
            for start in range(0, len(order), batch):
                idx = order[start : start + batch].to(a.device)
                extra = None
                if new_order is not None:
                    # Cycle the (usually few) new descriptors through the steps of the epoch.
                    k = min(len(idx), len(new_order))
                    offset = (steps * k) % len(new_order)
                    extra = a_new[new_order.roll(-offset)[:k]]
                loss = model.losses(
                    a[idx],
                    r[idx],
                    extra,
                    cfg.loss,
                    cfg.cross_reconstruction,
                    candidates[idx] if candidates is not None else None,
                    targets.select(idx) if targets is not None else None,
                    idx if mixture_own else None,
                    cfg.row_encoder,
                )
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
        return self._rows(descriptors)

    @property
    def can_leave_out(self) -> bool:
        """Whether :meth:`predict_left_out` can work: the mixture decoder blends seen rows, which can be left out."""
        return self.config.row_decoder == "mixture"

    @torch.no_grad()
    def predict_left_out(self, descriptors: torch.Tensor, left_out: torch.Tensor) -> torch.Tensor:
        """Rows for ``descriptors`` that blend none of the seen rows ``left_out`` (indices into the rows of the fit).

        What the calibration's simulation injects old classes with: their rows are out of every blend, as a new
        class's row is, without a second fit (their descriptors and rows did train the autoencoders).
        """
        if self.model is None:
            raise RuntimeError("ICISInjector.predict_left_out() called before fit() or load()")
        if not self.can_leave_out:
            raise ValueError("predict_left_out needs row_decoder='mixture': the linear decoder blends no seen rows")
        mask = torch.zeros(self._basis_rows(), dtype=torch.bool, device=self.model.descriptor_mean.device)
        mask[left_out.to(mask.device)] = True
        if bool(mask.all()):
            raise ValueError("predict_left_out must keep at least one seen row to blend")
        return self._rows(descriptors, mask)

    def _rows(self, descriptors: torch.Tensor, left_out: torch.Tensor | None = None) -> torch.Tensor:
        """The model's rows for ``descriptors`` (checked), on the CPU; ``left_out``: see :meth:`ICISModel.forward`."""
        expected = self.model.descriptor_ae.encoder[0].in_features
        if descriptors.dim() != 2 or descriptors.shape[1] != expected:
            raise ValueError(
                f"descriptors must be [n, {expected}] (the width this injector was trained on), got "
                f"{tuple(descriptors.shape)}: use the same embedder as for training"
            )
        device = self.model.descriptor_mean.device
        # In chunks: a top-k blend gathers k rows per class, too much at once for thousands of new classes.
        chunks = descriptors.detach().split(_PREDICT_CHUNK)
        return torch.cat([self.model(chunk.to(device, torch.float32), left_out).cpu() for chunk in chunks])

    def _basis_rows(self) -> int:
        decoder = self.model.weight_ae.decoder if self.model is not None else None
        return len(decoder.basis) if isinstance(decoder, _MixtureDecoder) else 0

    @property
    def reads_new_descriptors(self) -> bool:
        """Whether :meth:`fit` trains on the new classes' descriptors (the A->A term), so its fit depends on them."""
        return self.config.include_new_descriptors

    def fit_state(self, *, with_basis: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The trained weights and JSON metadata that :meth:`save` writes.

        Without ``with_basis`` the mixture's seen rows and their descriptors are left out: a cache that keys the fit
        by them gives them back to :meth:`load_fit_state` instead of storing the head again.
        """
        if self.model is None:
            raise RuntimeError("nothing to save: call fit() first")
        tensors = dict(self.model.state_dict())
        if not with_basis:
            tensors = {k: v for k, v in tensors.items() if k not in _BASIS_KEYS}
        metadata = {
            "format": "classifier_injection.icis",
            "config": json.dumps(self.config.to_dict()),
            "seed": str(self.seed),
            "history": json.dumps(self.history),
            "fingerprint": self.fingerprint or "",
            "descriptor_dim": str(self.model.descriptor_ae.encoder[0].in_features),
            "row_dim": str(self.model.weight_ae.encoder[0].in_features),
            "basis_rows": str(self._basis_rows()),
            "basis": "stored" if with_basis else "omitted",
        }
        return tensors, metadata

    def save(self, path: str, *, overwrite: bool = False) -> None:
        """Save the trained injector as one safetensors file (weights + JSON config in its metadata).

        Written atomically; an existing ``path`` is replaced only if ``overwrite``.
        """
        from .serialization import atomic_save_safetensors

        tensors, metadata = self.fit_state()
        atomic_save_safetensors(tensors, path, metadata, overwrite=overwrite)

    @classmethod
    def load(cls, path: str) -> ICISInjector:
        """Load an injector written by :meth:`save` (safetensors only: no pickle)."""
        from .serialization import read_safetensors

        tensors, metadata = read_safetensors(path)
        _check_format(metadata, path)
        try:
            injector = cls(_stored_config(metadata), seed=int(metadata["seed"]))
        except (KeyError, ValueError, TypeError, RecursionError) as err:
            raise ValueError(f"{path}: invalid ICIS injector metadata ({err})") from err
        return injector.load_fit_state(tensors, metadata, path)

    def load_fit_state(
        self,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        source: str | os.PathLike = "fit state",
        seen_descriptors: torch.Tensor | None = None,
        seen_rows: torch.Tensor | None = None,
    ) -> ICISInjector:
        """Take the trained weights of :meth:`fit_state` (from ``source``, untrusted) into this injector.

        The state's config and seed must be this injector's. A state saved without its basis needs the
        ``seen_descriptors`` and ``seen_rows`` it was fitted on. Nothing changes unless it loads.

        Raises:
            ValueError: not an ICIS state, another config or seed, shapes or values that do not fit.
        """
        from .serialization import check_state_dict

        _check_format(metadata, source)
        config = self.config
        try:
            if _stored_config(metadata) != config or int(metadata["seed"]) != self.seed:
                raise ValueError("it holds a fit with another config or seed than this injector's")
            descriptor_dim, row_dim = int(metadata["descriptor_dim"]), int(metadata["row_dim"])
            history = [float(x) for x in json.loads(metadata["history"])]
            # Sizes come from an untrusted file: check them against its tensors on the meta device first.
            basis_rows = int(metadata.get("basis_rows", "0"))
            if (basis_rows > 0) != (config.row_decoder == "mixture"):
                raise ValueError(f"basis_rows={basis_rows} does not match row_decoder={config.row_decoder!r}")
            if metadata.get("basis") == "omitted" and basis_rows:
                if seen_rows is None or seen_descriptors is None or len(seen_rows) != basis_rows:
                    raise ValueError(f"its basis was left out: pass the {basis_rows} seen rows and descriptors")
                tensors = {**tensors, **_basis_state(config, tensors, seen_descriptors, seen_rows, basis_rows)}
            with torch.device("meta"):
                skeleton = _empty_model(config, descriptor_dim, row_dim, basis_rows)
        except (KeyError, ValueError, TypeError, RecursionError, RuntimeError) as err:
            raise ValueError(f"{source}: invalid ICIS injector metadata ({err})") from err
        check_state_dict(tensors, skeleton.state_dict(), source, parameters=set(skeleton.state_dict()))
        model = _empty_model(config, descriptor_dim, row_dim, basis_rows)
        model.load_state_dict(tensors, strict=True)
        model.eval()
        self.model = model.to(self.device) if self.device is not None else model
        self.history = history
        self.fingerprint = metadata.get("fingerprint") or None
        return self


def _check_format(metadata: dict[str, str], source: str | os.PathLike) -> None:
    if metadata.get("format") != "classifier_injection.icis":
        raise ValueError(f"{source} is not an ICIS injector file (metadata format={metadata.get('format')!r})")


def _stored_config(metadata: dict[str, str]) -> ICISConfig:
    """The config a saved state declares (files from before an option existed get the behaviour they had)."""
    stored = json.loads(metadata["config"])
    if isinstance(stored, dict) and "row_decoder" not in stored:
        stored = {**stored, "row_decoder": "linear", "dropout": 0.0}
    if isinstance(stored, dict) and "mixture_top_k" not in stored:  # trained on every row, every epoch
        stored = {**stored, "mixture_top_k": None, "mixture_dense_up_to": 0, "classes_per_epoch": None}
    return ICISConfig.from_dict(stored)


#: State-dict entries that hold the fit's inputs (the mixture's seen rows and, for top-k blends, their descriptors).
_BASIS_KEYS = frozenset({"weight_ae.decoder.basis", "basis_keys"})


def _basis_state(
    config: ICISConfig,
    tensors: dict[str, torch.Tensor],
    seen_descriptors: torch.Tensor,
    seen_rows: torch.Tensor,
    basis_rows: int,
) -> dict[str, torch.Tensor]:
    """The basis entries a fit on ``seen_rows`` / ``seen_descriptors`` put in its state dict, as :meth:`fit` builds
    them."""
    rows = seen_rows.detach().cpu().to(torch.float32)
    if config.center:
        rows = rows - tensors["row_mean"]
    state = {"weight_ae.decoder.basis": rows}
    if _top_k(config, basis_rows) is not None:
        state["basis_keys"] = seen_descriptors.detach().cpu().to(torch.float32)
    return state


#: New classes predicted at a time.
_PREDICT_CHUNK = 256


def _empty_model(config: ICISConfig, descriptor_dim: int, row_dim: int, basis_rows: int) -> ICISModel:
    """An untrained model of the shapes a saved injector declares (on the current default device)."""
    basis = torch.empty(basis_rows, row_dim) if basis_rows else None
    keys = torch.ones(basis_rows, descriptor_dim) if basis_rows else None
    top_k = _top_k(config, basis_rows)
    return ICISModel(
        descriptor_dim, row_dim, config.latent_dim, basis=basis, dropout=config.dropout, top_k=top_k, basis_keys=keys
    )


def _blend_targets(decoder: nn.Module, rows: torch.Tensor) -> _BlendTargets | None:
    """What the row losses need to score blends of the whole basis without building them (``None``: build them, as
    for the linear decoder).

    The Gram matrix pays while the basis has fewer rows than twice their width: a blend's loss and gradient cost
    ``S^2`` per class through it (the gradient reuses the product), ``2 S x width`` built.
    """
    if not isinstance(decoder, _MixtureDecoder):
        return None
    return _BlendTargets.dense(decoder.basis) if len(decoder.basis) < 2 * rows.shape[1] else None


def _top_k(config: ICISConfig, seen_classes: int) -> int | None:
    """How many rows the mixture blends for a head of ``seen_classes`` (``None``: all of them)."""
    return config.mixture_top_k if seen_classes > config.mixture_dense_up_to else None
