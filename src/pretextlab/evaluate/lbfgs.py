"""The study's main probe: multinomial logistic regression on frozen features, full batch, L-BFGS.

Objective for one L2 strength (``l2``), on standardised features x (train mean/std)::

    mean_i cross_entropy(W x_i + b, y_i) + l2 / 2 * ||W||^2        (the bias is not regularised)

This is exactly scikit-learn's ``LogisticRegression(C=1 / (n * l2))`` objective divided by C*n, so
the two find the same optimum, and a fit stops on the same test (every gradient entry <= tol). The
loss and its gradient are computed analytically in one closure (one matmul forward, one backward,
nothing recomputed; float32 matmuls, float64 loss sums) and minimised with ``torch.optim.LBFGS``
and a strong-Wolfe line search, on the GPU when there is one. By default the fit runs in whitened
coordinates (``Whitening``): a change of variables that leaves the problem unchanged but makes it
well conditioned, which is what makes fits on real network features converge in tens of
iterations instead of hundreds.

``lbfgs_probe`` walks the L2 grid from the strongest to the weakest value, warm-starting each fit
from the previous solution, chooses the value with the best validation accuracy (ties go to the
stronger one) and reports the test accuracy of that one fit. Accuracies are in percent (0-100), as
every table and bar shows them, and named so (``val_top1_percent``).

Beyond one device's memory (ImageNet's 1.23M x 9000 training features are 44 GB in float32) the
probe runs data-parallel, ``shard=Shard.of_process_group()`` on every rank: each rank holds its
block of training rows, the standardisation's column sums, the whitening's second-moment matrix
and every closure's loss and gradient are all-reduced, and the preconditioner and each fit's
solution are rank 0's, broadcast; so the L2 chosen and the accuracies are those of one process
(equal up to the order of float sums) and a rank holds 1/world of the features.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.common import (
    SINGLE, ProbeData, ProbeResult, Shard, Standardised, accuracy_percent, check_finite, split_moments,
)

DEFAULT_L2_GRID: tuple[float, ...] = tuple(10.0**k for k in range(1, -7, -1))  # 1e1 ... 1e-6, strongest first
EIGH_FLOAT64_MAX_DIM = 4096


@dataclass(frozen=True)
class LbfgsConfig:
    """How the probe fits. ``tolerance`` stops a fit once every gradient entry is below it (the same
    test as scikit-learn's ``tol`` for lbfgs); ``max_iter`` caps L-BFGS iterations per grid value.
    ``precondition`` fits through the ``Whitening`` change of variables: same objective and
    optimum, far fewer iterations on correlated features, for one D x D eigendecomposition (one
    N x D SVD with fewer training rows N than features D)."""

    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    max_iter: int = 500
    tolerance: float = 1e-4
    history_size: int = 50
    device: str = "auto"
    standardize: bool = True
    precondition: bool = True

    def __post_init__(self) -> None:
        grid = tuple(self.l2_grid)
        if not grid or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in grid):
            raise PretextlabError(f"l2_grid must be a non-empty sequence of finite values >= 0, e.g. (1e-2, 1e-3, 1e-4), got {self.l2_grid!r}")
        object.__setattr__(self, "l2_grid", tuple(sorted((float(v) for v in grid), reverse=True)))
        for name in ("max_iter", "history_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PretextlabError(f"{name} must be a whole number >= 1, got {value!r}")
        if not isinstance(self.tolerance, (int, float)) or not self.tolerance > 0:
            raise PretextlabError(f"tolerance must be a number > 0 (e.g. 1e-4), got {self.tolerance!r}")


@dataclass
class LbfgsResult(ProbeResult):
    """The L-BFGS probe's outcome: ``per_setting`` has one entry per L2 value tried (its
    ``val_top1_percent``, iterations, convergence); ``settings`` the fit's own settings."""

    per_setting: list[dict[str, float]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _as_tensor(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 on ``device``; a float64 tensor stays float64 (the exactness checks fit in float64)."""
    if not isinstance(x, torch.Tensor):
        array = np.asarray(x, dtype=np.float32)
        x = torch.from_numpy(array if array.flags.writeable else array.copy())
    return x.to(device=device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


class _Converged(Exception):
    """Raised from the closure at the first evaluated point that meets the gradient tolerance."""


@dataclass
class Whitening:
    """A preconditioner for the fit: the eigenvectors V and eigenvalues s of the features'
    second-moment matrix (the covariance, for standardised features), computed once per probe.

    The fit then optimises U with W = (U * p) V^T, p = 1 / sqrt(s + damping): a change of variables,
    so the objective, its optimum and the stopping test on W's gradient are exactly those of the
    plain fit, but L-BFGS sees a far better conditioned problem (features of a network are strongly
    correlated; random-init ResNet50 pre-logits have hundreds of near-zero directions). The damping
    ``strength * l2`` makes the preconditioned Hessian close to a multiple of the identity both
    in high-variance directions (data term ~ curvature * s) and low-variance ones (the L2 term).
    V may have K < D columns (from fewer rows than features): the rest is the rows' null space,
    eigenvalue 0, where a fit from W = 0 never moves (the data term's gradient is a combination of
    rows, the L2 term's is W), so it needs no coordinates there (see ``_outside_variable``)."""

    eigenvalues: torch.Tensor  # (K,), >= 0
    eigenvectors: torch.Tensor  # (D, K), orthonormal columns; K < D: the other directions have eigenvalue 0
    strength: float = 30.0

    @classmethod
    def of(cls, x: torch.Tensor, strength: float = 30.0, shard: Shard = SINGLE, gram: bool = True) -> "Whitening":
        """From the (standardised) training features, all rows: the directions of small variance
        are the ones that slow L-BFGS down, and a row sample estimates them too poorly to help.
        With a ``shard``, ``x`` is this rank's rows: the matrix is all-reduced, decomposed on rank
        0 and broadcast, so every rank fits in the same coordinates. With fewer rows N than
        features D in one process (few-label probes of wide layers), ``gram`` takes the nonzero
        eigenpairs from the N x N side, O(N^2 D) not O(D^3) (False: the D x D matrix). Sharded, that
        needs every row on one rank, so the D x D matrix (a sum over ranks) is used whatever N is."""
        if gram and shard.world == 1 and x.shape[0] < x.shape[1]:
            return cls._of_rows(x, strength)
        rows = shard.sum_(torch.tensor([len(x)], dtype=torch.float64))
        second_moment = shard.sum_(torch.mm(x.t(), x)).div_(float(rows))
        dim = x.shape[1]
        eigenvalues = torch.empty(dim, dtype=x.dtype, device=x.device)
        eigenvectors = torch.empty(dim, dim, dtype=x.dtype, device=x.device)
        if shard.rank == 0:
            # float64 where it is cheap (D <= 4096 takes seconds); float32 halves the O(D^3) cost beyond.
            dtype = torch.float64 if dim <= EIGH_FLOAT64_MAX_DIM else x.dtype
            try:
                values, vectors = torch.linalg.eigh(second_moment.to(dtype))
            except RuntimeError:  # rare non-convergence in float32: float64 always converges here
                values, vectors = torch.linalg.eigh(second_moment.double())
            eigenvalues.copy_(values.clamp_min(0.0))
            eigenvectors.copy_(vectors)
        return cls(shard.broadcast_(eigenvalues), shard.broadcast_(eigenvectors), strength)

    @classmethod
    def _of_rows(cls, x: torch.Tensor, strength: float) -> "Whitening":
        """X^T X / N's eigenpairs of nonzero eigenvalue from X X^T / N's, v = X^T u / sqrt(N s), done
        as the thin SVD X = U S V^T (s = S^2 / N): no division by small S, so V stays orthonormal.
        S at or below numpy.linalg.matrix_rank's tolerance is rounding of an exact zero (centred rows
        have one), as the D x D matrix's eigenvalues there are (clamped at 0): null space."""
        rows, dim = x.shape
        dtype = torch.float64 if rows <= EIGH_FLOAT64_MAX_DIM else x.dtype
        try:
            _, singular, right = torch.linalg.svd(x.to(dtype), full_matrices=False)
        except RuntimeError:  # as for eigh: a rare float32 non-convergence, never float64's here
            dtype, (_, singular, right) = torch.float64, torch.linalg.svd(x.double(), full_matrices=False)
        keep = singular > singular.max() * max(rows, dim) * torch.finfo(dtype).eps
        eigenvalues = singular[keep].square().div_(rows)
        return cls(eigenvalues.to(x.dtype), right[keep].t().contiguous().to(x.dtype), strength)

    def _damping(self, l2: float) -> float:
        dim = self.eigenvectors.shape[0]  # the mean is over all D eigenvalues, the null space's zeros too
        mean = float(self.eigenvalues.mean()) if len(self.eigenvalues) == dim else float(self.eigenvalues.sum()) / dim
        return max(self.strength * l2, 1e-6 * max(mean, 1e-12))  # the floor: for l2 = 0, still invertible

    def scales(self, l2: float) -> torch.Tensor:
        return (self.eigenvalues + self._damping(l2)).rsqrt()

    def null_scale(self, l2: float) -> float:
        """The scale of every direction outside ``eigenvectors``' span (eigenvalue 0)."""
        return self._damping(l2) ** -0.5


def fit_logistic_regression(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    num_classes: int,
    l2: float,
    max_iter: int,
    tolerance: float,
    history_size: int,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    whitening: Whitening | None = None,
    shard: Shard = SINGLE,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Minimise mean cross-entropy + l2/2 ||W||^2 over (W (C, D), b (C,)) with full-batch L-BFGS.

    ``x`` (N, D) is used as given (standardise it first; ``lbfgs_probe`` does), in float32 on its
    own device when it is a tensor. ``init`` = (W, b) warm-starts the fit; ``whitening`` (see
    ``Whitening``) preconditions it without changing the problem. The fit stops at the first point
    where every entry of the gradient of the objective in (W, b) is at most ``tolerance`` (as
    scikit-learn's lbfgs ``tol``), or after ``max_iter`` iterations. Returns (W, b, info) with info:
    iterations, function_evals, loss, grad_max (largest gradient entry at the end), converged,
    seconds. With a ``shard``, (x, y) are this rank's rows: the data term's sums are all-reduced
    at every evaluation and the result is rank 0's (every rank computes the same steps).
    """
    started = time.perf_counter()
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    x = _as_tensor(x, device)
    targets = (y if isinstance(y, torch.Tensor) else torch.tensor(np.asarray(y), dtype=torch.int64)).to(device=device, dtype=torch.int64)
    rows, dim = x.shape
    dtype = x.dtype
    n = int(shard.sum_(torch.tensor([rows], dtype=torch.int64)))
    one_hot = torch.zeros(rows, num_classes, device=device, dtype=dtype)
    one_hot[torch.arange(rows, device=device), targets] = 1.0
    basis = scale = None
    if whitening is not None:
        basis = whitening.eigenvectors.to(device=device, dtype=dtype)
        scale = whitening.scales(l2).to(device=device, dtype=dtype)
    weight0 = torch.zeros(num_classes, dim, device=device, dtype=dtype) if init is None else init[0].detach().to(device=device, dtype=dtype)
    bias0 = torch.zeros(num_classes, device=device, dtype=dtype) if init is None else init[1].detach().to(device=device, dtype=dtype)
    # The optimised variable: W itself, or U with W = (U * scale) @ basis.T.
    variable = (weight0.clone() if basis is None else torch.mm(weight0, basis).div_(scale)).requires_grad_(True)
    bias = bias0.clone().requires_grad_(True)
    outside, null_scale = _outside_variable(weight0, basis, whitening, l2)
    optimizer = torch.optim.LBFGS(
        [variable, bias] if outside is None else [variable, outside, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        tolerance_grad=0.0,  # the closure applies the tolerance to the gradient in (W, b)
        tolerance_change=1e-12,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )
    inv_n = 1.0 / n
    last: dict[str, Any] = {"evals": 0}

    def weight_of(u: torch.Tensor) -> torch.Tensor:
        weight = u if basis is None else torch.mm(u * scale, basis.t())
        return weight if outside is None else weight.add_(outside, alpha=null_scale)

    def closure() -> torch.Tensor:
        # The gradient is written directly (softmax - onehot): one matmul forward, one backward,
        # no autograd graph over the (N, D) features.
        with torch.no_grad():
            weight = weight_of(variable)
            logits = torch.addmm(bias, x, weight.t())
            log_norm = torch.logsumexp(logits, dim=1, keepdim=True)
            data_loss = (log_norm.squeeze(1) - (logits * one_hot).sum(1)).sum(dtype=torch.float64)
            residual = torch.exp(logits.sub_(log_norm)).sub_(one_hot)  # softmax - onehot, in place
            if shard.world == 1:
                weight_grad = torch.addmm(weight, residual.t(), x, beta=l2, alpha=inv_n)
                bias.grad = residual.sum(0).mul_(inv_n)
            else:
                # The loss sum stays float64 (the line search compares losses); the gradient's sums
                # travel in the fit's dtype, in one message.
                data_loss = shard.sum_(data_loss.view(1))[0]
                sums = shard.sum_(torch.cat([torch.mm(residual.t(), x).view(-1), residual.sum(0)])).mul_(inv_n)
                weight_grad = sums[: weight.numel()].view_as(weight).add_(weight, alpha=l2)
                bias.grad = sums[weight.numel() :]
            data_loss = data_loss * inv_n
            loss = data_loss + 0.5 * l2 * weight.pow(2).sum(dtype=torch.float64)
            grad_max = max(float(weight_grad.abs().max()), float(bias.grad.abs().max()))
            last.update(evals=last["evals"] + 1, loss=float(loss), grad_max=grad_max)
            if grad_max <= tolerance:
                raise _Converged
            if basis is None:
                variable.grad = weight_grad
            else:
                inside = torch.mm(weight_grad, basis)
                if outside is not None:  # the gradient's part outside the basis's span
                    outside.grad = torch.addmm(weight_grad, inside, basis.t(), alpha=-1.0).mul_(null_scale)
                variable.grad = inside.mul_(scale)
            return loss

    try:
        optimizer.step(closure)
        # L-BFGS ran out of iterations (or stalled): one more evaluation gives the loss and gradient
        # at the point it ended on (its last evaluation may have been a rejected line-search trial).
        closure()
    except _Converged:
        pass  # the parameters are at the evaluated point that met the tolerance
    state = optimizer.state[optimizer._params[0]]
    info = {
        "iterations": int(state.get("n_iter", 0)),
        "function_evals": int(last["evals"]),
        "loss": last["loss"],
        "grad_max": last["grad_max"],
        "converged": last["grad_max"] <= tolerance,
        "seconds": time.perf_counter() - started,
    }
    with torch.no_grad():
        weight = weight_of(variable.detach())
    # Every rank took the same steps on the same all-reduced values; rank 0's copy makes it certain.
    return shard.broadcast_(weight), shard.broadcast_(bias.detach()), info


def _outside_variable(
    weight0: torch.Tensor, basis: torch.Tensor | None, whitening: Whitening | None, l2: float,
) -> tuple[torch.Tensor | None, float]:
    """For a basis V narrower than the features: the start's part outside its span as one more
    variable Z, W = (U * p) V^T + q Z with q = ``null_scale``: the D x D fit with its (arbitrary)
    null-space eigenvectors, up to L-BFGS's first step length (its gradient's L1 norm depends on
    them). None from W = 0 or a warm start from this basis: a part below sqrt(eps) of W is rounding."""
    if basis is None or whitening is None or basis.shape[1] == basis.shape[0]:
        return None, 0.0
    null = torch.addmm(weight0, torch.mm(weight0, basis), basis.t(), alpha=-1.0)
    if float(null.norm()) <= math.sqrt(torch.finfo(null.dtype).eps) * float(weight0.norm()):
        return None, 0.0
    null_scale = whitening.null_scale(l2)
    return null.div_(null_scale).requires_grad_(True), null_scale


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: torch.addmm(bias, x, weight.t())


def lbfgs_probe(
    data: ProbeData,
    config: LbfgsConfig | None = None,
    progress: bool = True,
    label: str = "",
) -> LbfgsResult:
    """Fit along ``config.l2_grid`` (strongest first, warm-started) on ``data.train``, choose L2 on
    ``data.val``, score ``data.test``.

    Each split is (features float (N, D), labels int (N,)); features may be memmaps. Accuracies in
    the result are percent. ``label`` names what is probed (e.g. the layer) on the progress bar.
    Data-parallel over ranks: ``fit_lbfgs_probe(..., shard=...)`` (``distributed_probe``).
    """
    return fit_lbfgs_probe(data, config, progress=progress, label=label)[0]


def fit_lbfgs_probe(
    data: ProbeData, config: LbfgsConfig | None = None, *, progress: bool = True, label: str = "", shard: Shard = SINGLE,
    dtype: torch.dtype = torch.float32, gram: bool = True,
) -> tuple[LbfgsResult, torch.Tensor, torch.Tensor]:
    """``lbfgs_probe``, also returning the chosen classifier (W (C, D), b (C,)) in standardised
    coordinates; ``dtype`` float64 fits in double precision (for exactness checks). With a
    ``shard`` every rank calls this with the same whole splits and loads only its rows. ``gram``
    False whitens from the D x D matrix even with fewer rows than features (see ``Whitening.of``)."""
    started = time.perf_counter()
    config = config or LbfgsConfig()
    splits, num_classes = data.checked(), data.num_classes
    # This rank's rows of every split: the training rows it holds, the val/test rows it scores.
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        (x[shard.rows(len(x))], y[shard.rows(len(y))]) for x, y in (splits["train"], splits["val"], splits["test"])
    )
    device = resolve_device(config.device)
    moments = split_moments(train_x, "train", config.standardize, shard)
    check_finite(val_x, "val", shard)
    check_finite(test_x, "test", shard)
    x = Standardised(train_x, moments, device, resident=True, dtype=dtype).whole
    assert x is not None
    val_set, test_set = (Standardised(split_x, moments, device, dtype=dtype) for split_x in (val_x, test_x))
    y = torch.tensor(train_y, dtype=torch.int64, device=device)
    whitening = Whitening.of(x, shard=shard, gram=gram) if config.precondition else None
    per_setting: list[dict[str, float]] = []
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
    init = None
    bar = tqdm(config.l2_grid, desc=f"L-BFGS probe {label}".rstrip(), unit="l2", disable=not progress or shard.rank != 0)
    for l2 in bar:
        weight, bias, info = fit_logistic_regression(
            x, y, num_classes, l2, config.max_iter, config.tolerance, config.history_size, init=init, whitening=whitening,
            shard=shard,
        )
        init = (weight, bias)
        val_top1 = accuracy_percent(_linear(weight, bias), val_set, val_y, shard)
        per_setting.append(
            {
                "l2": l2,
                "val_top1_percent": val_top1,
                "iterations": info["iterations"],
                "function_evals": info["function_evals"],
                "converged": info["converged"],
                "loss": info["loss"],
                "seconds": info["seconds"],
            }
        )
        bar.set_postfix(l2=f"{l2:.0e}", val=f"{val_top1:.2f}%", iters=info["iterations"])
        if best is None or val_top1 > best[1]:  # strictly better: ties keep the stronger L2
            best = (l2, val_top1, weight.clone(), bias.clone())
    assert best is not None
    chosen_l2, val_top1, weight, bias = best
    test_top1 = accuracy_percent(_linear(weight, bias), test_set, test_y, shard)
    settings: dict[str, Any] = {
        "l2_grid": list(config.l2_grid),
        "max_iter": config.max_iter,
        "tolerance": config.tolerance,
        "history_size": config.history_size,
        "standardize": config.standardize,
        "precondition": config.precondition,
        "device": str(device),
    }
    if shard.world > 1:
        # How the work was split (not part of the recipe: the numbers are those of one process).
        settings.update(world_size=shard.world, rank_train_rows=int(len(x)), rank_feature_bytes=x.numel() * x.element_size())
    result = LbfgsResult(
        probe="lbfgs",
        val_top1_percent=val_top1,
        test_top1_percent=test_top1,
        chosen={"l2": chosen_l2},
        per_setting=per_setting,
        seconds=time.perf_counter() - started,
        train_size=int(len(splits["train"][1])),
        settings=settings,
    )
    return result, weight, bias
