"""Baselines of the ICIS paper, behind the same :class:`~classifier_injection.injector.Injector` interface.

Every class here learns (or computes) a map from class descriptors to classifier rows ``[W | b]`` using the
seen classes only, so any of them can replace ICIS in :func:`~classifier_injection.inject`::

    model = inject(model, ["capybara"], injector=RidgeInjector())

* :class:`RidgeInjector`: closed-form ridge regression descriptor -> row (the simplest linear map).
* :class:`COSTAInjector`: COSTA (Mensink et al., "COSTA: Co-Occurrence Statistics for Zero-Shot
  Classification", CVPR 2014): a new row is the similarity-weighted mean of the seen rows.
* :class:`VGSEWAvgInjector`: VGSE's weighted average (Xu et al., "VGSE: Visually-Grounded Semantic
  Embeddings for Zero-Shot Learning", CVPR 2022): weights ``exp(-eta ||a_u - a_s||)``.
* :class:`VGSESMOInjector`: VGSE's similarity matching optimisation: learn convex weights over the seen
  classes that reconstruct the new descriptor, apply them to the seen rows.
* :class:`SubRegInjector`: subspace regularisation (Akyürek et al., "Subspace Regularizers for Few-Shot
  Class Incremental Learning", ICLR 2022), in the ICIS paper's form: an MLP descriptor -> row trained with MSE
  plus a penalty on the part of the predicted weights outside the span of the seen weights.
* :class:`MLPInjector`: a single MLP descriptor -> row trained with the cosine loss (the ICIS paper's "MLP"
  ablation: ICIS without the autoencoders).

:class:`ConSE` (Norouzi et al., "Zero-Shot Learning by Convex Combination of Semantic Embeddings", ICLR 2014)
injects no rows: it maps a photo's seen-class probabilities to a point in descriptor space and picks the
closest class there. It has its own scoring API (:meth:`ConSE.scores`, :meth:`ConSE.predict_gzsl`).

Rows are predicted in float32 on the device of the descriptors. Training baselines are seeded and
deterministic on the CPU.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .injector import check_fit_inputs

__all__ = [
    "COSTAInjector",
    "ConSE",
    "MLPInjector",
    "RidgeInjector",
    "SubRegInjector",
    "VGSESMOInjector",
    "VGSEWAvgInjector",
]


def _check_predict(descriptors: torch.Tensor, expected_dim: int | None, name: str) -> None:
    if expected_dim is None:
        raise RuntimeError(f"{name}.predict() called before fit()")
    if descriptors.dim() != 2 or descriptors.shape[1] != expected_dim:
        raise ValueError(
            f"descriptors must be [n, {expected_dim}] (the width {name} was fitted on), got "
            f"{tuple(descriptors.shape)}: use the same embedder as for fitting"
        )


def _positive(value: float, name: str) -> float:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and value > 0):
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


class _SeenMemory:
    """Base of the non-parametric baselines: they keep the seen descriptors and rows and combine rows."""

    name = "seen-memory"
    #: Its fit is fixed by its class, ``hparams()`` and the seed: calibration choices may be cached.
    cacheable = True

    def __init__(self) -> None:
        self.seen_descriptors: torch.Tensor | None = None
        self.seen_rows: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return self.seen_rows is not None

    def fit(self, seen_descriptors: torch.Tensor, seen_rows: torch.Tensor, new_descriptors: torch.Tensor | None = None):
        check_fit_inputs(seen_descriptors, seen_rows, new_descriptors)
        self.seen_descriptors = seen_descriptors.detach().float()
        self.seen_rows = seen_rows.detach().float().to(self.seen_descriptors.device)
        return self

    def weights(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Combination weights ``[n, S]`` over the seen classes."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        _check_predict(
            descriptors, None if self.seen_descriptors is None else self.seen_descriptors.shape[1], self.name
        )
        a = descriptors.detach().float().to(self.seen_descriptors.device)
        return self.weights(a) @ self.seen_rows


class RidgeInjector:
    """Closed-form ridge regression from descriptors to rows.

    Descriptors and rows are centred on the seen classes, so the intercept is the mean seen row and
    ``alpha`` only shrinks the slope: ``row(a) = mean_r + (a - mean_a) C``, with
    ``C = (A0^T A0 + alpha I)^-1 A0^T R0``. Solved in float64.

    Args:
        alpha: ridge penalty (> 0).
    """

    name = "ridge"
    #: Its fit is fixed by its class, ``hparams()`` and the seed: calibration choices may be cached.
    cacheable = True

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = _positive(alpha, "alpha")
        self.coef: torch.Tensor | None = None
        self.mean_descriptor: torch.Tensor | None = None
        self.mean_row: torch.Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return self.coef is not None

    def hparams(self) -> dict:
        return {"alpha": self.alpha}

    def fit(
        self, seen_descriptors: torch.Tensor, seen_rows: torch.Tensor, new_descriptors: torch.Tensor | None = None
    ) -> RidgeInjector:
        check_fit_inputs(seen_descriptors, seen_rows, new_descriptors)
        a = seen_descriptors.detach().double()
        r = seen_rows.detach().double().to(a.device)
        self.mean_descriptor, self.mean_row = a.mean(0), r.mean(0)
        a0 = a - self.mean_descriptor
        gram = a0.T @ a0 + self.alpha * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        self.coef = torch.linalg.solve(gram, a0.T @ (r - self.mean_row))
        return self

    @torch.no_grad()
    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        _check_predict(descriptors, None if self.coef is None else self.coef.shape[0], self.name)
        a = descriptors.detach().double().to(self.coef.device)
        return ((a - self.mean_descriptor) @ self.coef + self.mean_row).float()


class COSTAInjector(_SeenMemory):
    """COSTA (Mensink et al., CVPR 2014): ``w_u = sum_s c_us w_s / sum_s c_us``.

    COSTA defines ``c_us`` from co-occurrence counts; with text descriptors (as in the ICIS paper) it is the
    inner product ``<a_u, a_s>``. Counts are non-negative, so negative products are clipped to 0 (otherwise
    the normaliser can vanish). ``top_k`` keeps only the ``k`` most similar seen classes (COSTA's top-K
    variant); ``None`` uses all of them, the form given in the ICIS paper.

    Args:
        top_k: number of seen classes combined, or ``None`` for all.
    """

    name = "costa"

    def __init__(self, top_k: int | None = None) -> None:
        super().__init__()
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
        self.top_k = top_k

    def hparams(self) -> dict:
        return {"top_k": self.top_k}

    def weights(self, descriptors: torch.Tensor) -> torch.Tensor:
        c = (descriptors @ self.seen_descriptors.T).clamp_min(0)
        if self.top_k is not None and self.top_k < c.shape[1]:
            kth = c.topk(self.top_k, dim=1).values[:, -1:]
            c = torch.where(c >= kth, c, torch.zeros_like(c))
        total = c.sum(1, keepdim=True)
        # A class similar to no seen class gets the mean seen row rather than a division by zero.
        uniform = torch.full_like(c, 1.0 / c.shape[1])
        return torch.where(total > 0, c / total.clamp_min(1e-12), uniform)


class VGSEWAvgInjector(_SeenMemory):
    """VGSE-WAvg (Xu et al., CVPR 2022): ``w_u = sum_s exp(-eta ||a_u - a_s||) w_s`` (weights normalised).

    Normalising the weights to sum to 1 changes only the scale of the row (which calibration sets anyway),
    and keeps its bias in the range of the seen biases.

    Args:
        eta: temperature of the distance kernel (5 in the VGSE paper).
    """

    name = "vgse-wavg"

    def __init__(self, eta: float = 5.0) -> None:
        super().__init__()
        self.eta = _positive(eta, "eta")

    def hparams(self) -> dict:
        return {"eta": self.eta}

    def weights(self, descriptors: torch.Tensor) -> torch.Tensor:
        return torch.softmax(-self.eta * torch.cdist(descriptors, self.seen_descriptors), dim=1)


class VGSESMOInjector(_SeenMemory):
    """VGSE-SMO (Xu et al., CVPR 2022): similarity matching optimisation.

    For each new class, learn logits ``r`` over the seen classes such that ``sum_s softmax(r)_s a_s``
    reconstructs ``a_u`` (squared error), then ``w_u = sum_s softmax(r)_s w_s``. All new classes are optimised
    at once (one ``[n, S]`` logit matrix) from ``r = 0`` (uniform weights). The paper uses SGD; at the
    uniform start the softmax gradient is ~1/S, so a plain step size would depend on the number of seen
    classes: Adam is used instead (its steps are scale-free). The defaults converge the reconstruction loss
    (an image-free criterion) on ImageNet-sized heads.

    Args:
        lr: Adam learning rate on ``r``.
        steps: number of full-batch steps.
    """

    name = "vgse-smo"

    def __init__(self, lr: float = 0.1, steps: int = 200) -> None:
        super().__init__()
        self.lr = _positive(lr, "lr")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        self.steps = steps
        self.reconstruction_loss: float | None = None

    def hparams(self) -> dict:
        return {"lr": self.lr, "steps": self.steps}

    def fit(
        self, seen_descriptors: torch.Tensor, seen_rows: torch.Tensor, new_descriptors: torch.Tensor | None = None
    ) -> VGSESMOInjector:
        super().fit(seen_descriptors, seen_rows, new_descriptors)
        self._solved: tuple[torch.Tensor, torch.Tensor] | None = None
        if new_descriptors is not None and len(new_descriptors):
            # The optimisation is the training of this method: do it now for the classes to inject.
            a = new_descriptors.detach().float().to(self.seen_descriptors.device)
            self._solved = (a.clone(), self._optimise(a))
        return self

    def weights(self, descriptors: torch.Tensor) -> torch.Tensor:
        solved = getattr(self, "_solved", None)
        if solved is not None and solved[0].shape == descriptors.shape and torch.equal(solved[0], descriptors):
            return solved[1]
        return self._optimise(descriptors)

    def _optimise(self, descriptors: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(descriptors), len(self.seen_descriptors), device=descriptors.device)
        logits.requires_grad_(True)
        optimizer = torch.optim.Adam([logits], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                reconstruction = torch.softmax(logits, dim=1) @ self.seen_descriptors
                # Squared error summed over descriptor dimensions, averaged over classes.
                loss = (reconstruction - descriptors).pow(2).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.reconstruction_loss = loss.item()
        return torch.softmax(logits.detach(), dim=1)


class _MLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _TrainedMLP:
    """Base of the MLP baselines: descriptor -> row, Adam, fixed number of epochs, seeded."""

    name = "mlp-base"
    #: Its fit is fixed by its class, ``hparams()`` and the seed: calibration choices may be cached.
    cacheable = True

    def __init__(
        self,
        *,
        hidden_dim: int = 1024,
        lr: float = 1e-3,
        batch_size: int = 128,
        epochs: int = 200,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        for key, value in (("hidden_dim", hidden_dim), ("batch_size", batch_size), ("epochs", epochs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.hidden_dim, self.batch_size, self.epochs = hidden_dim, batch_size, epochs
        self.lr = _positive(lr, "lr")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        self.weight_decay = weight_decay
        self.seed = seed
        self.model: _MLP | None = None
        self.history: list[float] = []

    @property
    def is_fitted(self) -> bool:
        return self.model is not None

    def hparams(self) -> dict:
        return {
            "hidden_dim": self.hidden_dim,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
        }

    def _prepare(self, seen_rows: torch.Tensor) -> None:
        """Hook run before training (e.g. to build a projector from the seen rows)."""

    def loss(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fit(self, seen_descriptors: torch.Tensor, seen_rows: torch.Tensor, new_descriptors: torch.Tensor | None = None):
        check_fit_inputs(seen_descriptors, seen_rows, new_descriptors)
        a = seen_descriptors.detach().float()
        r = seen_rows.detach().float().to(a.device)
        self._prepare(r)
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = _MLP(a.shape[1], self.hidden_dim, r.shape[1]).to(a.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        batch = min(self.batch_size, len(a))
        self.history = []
        model.train()
        for _ in range(self.epochs):
            order = torch.randperm(len(a), generator=generator).to(a.device)
            total, steps = 0.0, 0
            for start in range(0, len(a), batch):
                idx = order[start : start + batch]
                loss = self.loss(model(a[idx]), r[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, steps = total + loss.item(), steps + 1
            self.history.append(total / steps)
        model.eval()
        self.model = model
        return self

    @torch.no_grad()
    def predict(self, descriptors: torch.Tensor) -> torch.Tensor:
        expected = None if self.model is None else self.model.net[0].in_features
        _check_predict(descriptors, expected, self.name)
        device = next(self.model.parameters()).device
        return self.model(descriptors.detach().float().to(device))


class MLPInjector(_TrainedMLP):
    """A single MLP descriptor -> row (the ICIS paper's "MLP" ablation: no autoencoders, no cross terms).

    Args:
        loss: ``"cosine"`` (``1 - cos`` per row, as ICIS) or ``"mse"``.
        hidden_dim, lr, batch_size, epochs, weight_decay, seed: training settings (Adam).
    """

    name = "mlp"

    def __init__(self, loss: Literal["cosine", "mse"] = "cosine", **kwargs) -> None:
        super().__init__(**kwargs)
        if loss not in ("cosine", "mse"):
            raise ValueError(f"loss must be 'cosine' or 'mse', got {loss!r}")
        self.loss_name = loss

    def hparams(self) -> dict:
        return {**super().hparams(), "loss": self.loss_name}

    def loss(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "mse":
            return F.mse_loss(predicted, target)
        return (1 - F.cosine_similarity(predicted, target, dim=1)).mean()


class SubRegInjector(_TrainedMLP):
    """Sub.Reg. (Akyürek et al., ICLR 2022) as in the ICIS paper: MLP descriptor -> row, trained with
    ``MSE(pred, row) + reg * ||w - Q Q^T w||`` where ``Q`` is an orthonormal basis of the seen weight vectors.

    The penalty keeps predicted weight vectors near the subspace spanned by the seen ones.

    Args:
        reg: weight of the subspace penalty (0.001 in the ICIS paper's use).
        hidden_dim, lr, batch_size, epochs, weight_decay, seed: training settings (Adam).
    """

    name = "subreg"

    def __init__(self, reg: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        if not reg >= 0:
            raise ValueError(f"reg must be >= 0, got {reg!r}")
        self.reg = float(reg)
        self.basis: torch.Tensor | None = None

    def hparams(self) -> dict:
        return {**super().hparams(), "reg": self.reg}

    def _prepare(self, seen_rows: torch.Tensor) -> None:
        # Orthonormal basis of the span of the seen weight vectors (rank-revealing via SVD).
        _, s, vh = torch.linalg.svd(seen_rows[:, :-1], full_matrices=False)
        rank = int((s > s.max() * max(seen_rows.shape) * torch.finfo(s.dtype).eps).sum())
        self.basis = vh[:rank].T.contiguous()  # [D, rank]

    def loss(self, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        w = predicted[:, :-1]
        outside = w - (w @ self.basis) @ self.basis.T
        return F.mse_loss(predicted, target) + self.reg * outside.norm(dim=1).mean()


class ConSE:
    """ConSE (Norouzi et al., ICLR 2014): convex combination of semantic embeddings. Injects no rows.

    A photo's embedding is ``e = sum_{s in top T} p_s a_s / sum_{s in top T} p_s``, with ``p`` the softmax of
    the seen-class logits and the sum over the ``top_t`` most probable seen classes; a class ``c`` scores
    ``cos(e, a_c)``.

    Args:
        top_t: number of most probable seen classes combined (10 in the paper).
    """

    name = "conse"

    def __init__(self, top_t: int = 10) -> None:
        if isinstance(top_t, bool) or not isinstance(top_t, int) or top_t < 1:
            raise ValueError(f"top_t must be a positive integer, got {top_t!r}")
        self.top_t = top_t

    def hparams(self) -> dict:
        return {"top_t": self.top_t}

    @torch.no_grad()
    def embed(self, seen_logits: torch.Tensor, seen_descriptors: torch.Tensor) -> torch.Tensor:
        """The photos' points ``[n, d]`` in descriptor space from their seen-class logits ``[n, S]``."""
        if seen_logits.dim() != 2 or seen_logits.shape[1] != seen_descriptors.shape[0]:
            raise ValueError(
                f"seen_logits must be [n, {seen_descriptors.shape[0]}] (one logit per seen descriptor), got "
                f"{tuple(seen_logits.shape)}"
            )
        probs = torch.softmax(seen_logits.float(), dim=1)
        top = probs.topk(min(self.top_t, probs.shape[1]), dim=1)
        weights = top.values / top.values.sum(1, keepdim=True)
        return torch.einsum("nt,ntd->nd", weights, seen_descriptors.float()[top.indices])

    @torch.no_grad()
    def scores(
        self, seen_logits: torch.Tensor, seen_descriptors: torch.Tensor, candidate_descriptors: torch.Tensor
    ) -> torch.Tensor:
        """Cosine scores ``[n, C]`` of the photos against ``C`` candidate classes (ZSL: the new classes)."""
        e = self.embed(seen_logits, seen_descriptors)
        return F.normalize(e, dim=1) @ F.normalize(candidate_descriptors.float(), dim=1).T

    @torch.no_grad()
    def predict_gzsl(
        self,
        seen_logits: torch.Tensor,
        seen_descriptors: torch.Tensor,
        new_descriptors: torch.Tensor,
        seen_labels: torch.Tensor,
        new_labels: torch.Tensor,
    ) -> torch.Tensor:
        """Generalised prediction over seen and new classes, as labels ``[n]``.

        The photo's embedding is compared with the descriptors of all classes, seen and new. If a new class
        is the closest, it is predicted; otherwise the original head decides among the seen classes (its
        top logit), so ConSE never changes a seen-class prediction of the model unless a new class wins.

        Args:
            seen_labels: label of each seen class (column order of ``seen_logits``).
            new_labels: label of each new class (row order of ``new_descriptors``).
        """
        candidates = torch.cat([seen_descriptors, new_descriptors])
        sims = self.scores(seen_logits, seen_descriptors, candidates)
        best = sims.argmax(1)
        n_seen = len(seen_descriptors)
        new_wins = best >= n_seen
        head_choice = seen_labels[seen_logits.argmax(1)]
        new_choice = new_labels[(best - n_seen).clamp_min(0)]
        return torch.where(new_wins, new_choice, head_choice)
