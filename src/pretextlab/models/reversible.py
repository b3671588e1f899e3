"""The memory-saving backward pass over a chain of reversible units (Gomez et al. 2017).

A reversible unit maps (x1, x2) -> (x2, x1 + F(x2)) on the channel halves, so its input is
recomputed from its output: x2 is the output's first half and x1 = y1 - F(x2). A chain of such
units therefore need not keep its activations for backpropagation: ``reversible_sequence`` runs
the chain's forward without recording a graph and keeps only the chain's input and output. Its
backward walks the units from the last, each time recomputing F(x2) with a graph, recovering the
unit's input from it, backpropagating through that one F and dropping it; the first unit takes
its input from the kept chain input instead, exactly. Activation memory of the chain no longer
grows with its length; the price is one extra evaluation of every F.

Exactness, in the ways ordinary autograd would see it:

- BatchNorm: F's recomputation sees the same x2 as the forward, so in train mode it normalises
  with the same batch statistics; it runs inside ``batch_stats_without_update`` so the running
  statistics are updated once per step, by the forward, as with ordinary backprop.
- Randomness: the CPU (and the input's accelerator) random state is captured before every F in
  the forward and restored for its recomputation, so dropout draws the same masks; the caller's
  random stream is left as it was.
- Mixed precision: the autocast state of the forward is re-entered for the recomputation (the
  backward may run on another thread, where autocast is off).
- Parameters are inputs of one autograd node per chain, and their gradients come back from its
  backward (computed with ``torch.autograd.grad``, which writes no ``.grad``), so each
  parameter's gradient is accumulated exactly once per backward: DistributedDataParallel's
  hooks fire once, as with ordinary backprop.

The only difference from ordinary autograd is roundoff: x1 = (x1 + F(x2)) - F(x2) in floating
point, and the error of one unit's recovered input feeds the recovery of the units before it.
Gradients agree with ordinary autograd's to about 3e-6 relative in float32 and 1e-14 in float64,
except where a recomputed pre-activation lands within that roundoff of ReLU's kink, whose
derivative then flips (rare; in float32 the ordinary gradient is itself that sensitive).
``ReconstructionCheck`` measures it against the true inputs (kept for the purpose, which costs
the memory the method saves) and warns past a tolerance. Double backward is not supported.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from pretextlab.errors import PretextlabError


class AdditiveCoupling(Protocol):
    """What ``reversible_sequence`` needs of a unit: ``forward`` computes (x1, x2) -> (x2, x1 + F(x2))
    on the channel halves (dim 1) with the module ``F``."""

    F: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@contextlib.contextmanager
def batch_stats_without_update(module: nn.Module) -> Iterator[None]:
    """Within this block, BatchNorm layers of ``module`` in train mode normalise with the batch's
    statistics but leave running_mean, running_var and num_batches_tracked untouched.

    Used to recompute a reversible unit's F (in ``inverse``, and in the memory-saving backward)
    without counting the batch twice. Eval-mode layers are unaffected: they read the running
    statistics either way. It switches ``track_running_stats`` off temporarily, which is how
    ``nn.BatchNorm2d.forward`` (and ``SyncBatchNorm``) decide not to pass, and so not update, the
    buffers.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True


@dataclass
class ReconstructionCheck:
    """Measures, in every backward, how far each unit's recomputed input is from the true one.

    ``errors`` maps a unit's name (e.g. ``"block3.unit5"``) to the relative error of the latest
    backward, ||recomputed - true|| / ||true|| over the unit's whole input. A ``RuntimeWarning``
    is issued past the tolerance: ``tolerance`` if given, else one for the precision the units
    ran in, ``FULL_PRECISION_TOLERANCE`` (float32 chains of the study's depth reconstruct to about
    1e-6) or, under autocast, ``LOW_PRECISION_TOLERANCE_IN_EPS`` times that dtype's epsilon: a
    bf16 F is recomputed bit for bit only where its inputs round the same way, and a few
    rounding flips per unit compound, to about 1e-2 relative over RevNet50's stages (about
    bf16's own rounding of every activation, which ordinary bf16 training also has).

    Turning the check on keeps every unit's input in the forward, so it costs the memory the
    reversible backward saves: it is a diagnostic, not a training setting.
    """

    tolerance: float | None = None
    errors: dict[str, float] = field(default_factory=dict)

    FULL_PRECISION_TOLERANCE = 1e-4
    LOW_PRECISION_TOLERANCE_IN_EPS = 8

    def __post_init__(self) -> None:
        if self.tolerance is None:
            return
        if not isinstance(self.tolerance, (int, float)) or isinstance(self.tolerance, bool) or not (
            math.isfinite(self.tolerance) and self.tolerance > 0
        ):
            raise PretextlabError(
                f"the reconstruction check's tolerance must be a positive finite number or None (chosen by "
                f"precision), got {self.tolerance!r}: e.g. {self.FULL_PRECISION_TOLERANCE}"
            )

    @property
    def worst(self) -> float:
        """The largest relative error of the latest backward (0.0 before any)."""
        return max(self.errors.values(), default=0.0)

    def tolerance_for(self, autocast_dtype: torch.dtype | None) -> float:
        """The tolerance in force when the units ran under autocast to ``autocast_dtype`` (or None)."""
        if self.tolerance is not None:
            return float(self.tolerance)
        if autocast_dtype is None:
            return self.FULL_PRECISION_TOLERANCE
        return max(self.FULL_PRECISION_TOLERANCE, self.LOW_PRECISION_TOLERANCE_IN_EPS * torch.finfo(autocast_dtype).eps)

    def record(
        self,
        name: str,
        recomputed: Sequence[torch.Tensor],
        true: Sequence[torch.Tensor],
        autocast_dtype: torch.dtype | None = None,
    ) -> float:
        """Store (and return) the relative error of ``recomputed`` against ``true`` (matching
        pieces of one unit's input), warning when it exceeds the tolerance."""
        with torch.no_grad():
            squared_difference = sum(float((r.double() - t.double()).pow(2).sum()) for r, t in zip(recomputed, true))
            squared_norm = sum(float(t.double().pow(2).sum()) for t in true)
        error = math.sqrt(squared_difference / squared_norm) if squared_norm > 0 else math.sqrt(squared_difference)
        self.errors[name] = error
        tolerance = self.tolerance_for(autocast_dtype)
        if not error <= tolerance:  # also catches NaN
            precision = "float32 or float64" if autocast_dtype is None else f"{autocast_dtype} autocast"
            warnings.warn(
                f"reversible backward: the input of {name} was recomputed with relative error {error:.3g} "
                f"(tolerance {tolerance:.3g} for {precision}), so its gradients are off by about as much. "
                "Look for exploding activations, train in higher precision, or build the network with "
                "reversible_backward=False",
                RuntimeWarning,
                stacklevel=2,
            )
        return error


@dataclass
class _RandomState:
    """The CPU generator's state and, for an accelerator input, that device's, before one F."""

    cpu: torch.Tensor
    device_type: str
    device_index: int | None
    device_state: torch.Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> "_RandomState":
        device_state, index = None, None
        if device.type not in ("cpu", "meta"):
            module = getattr(torch, device.type)
            index = device.index if device.index is not None else module.current_device()
            device_state = module.get_rng_state(index)
        return cls(torch.get_rng_state(), device.type, index, device_state)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Within this block the generators are as they were at capture; afterwards as before it."""
        devices = [] if self.device_index is None else [self.device_index]
        device_type = "cuda" if self.device_index is None else self.device_type
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            torch.set_rng_state(self.cpu)
            if self.device_state is not None:
                getattr(torch, self.device_type).set_rng_state(self.device_state, self.device_index)
            yield


def _autocast_states(device_type: str) -> list[dict[str, Any]]:
    """The autocast settings in force for ``device_type`` and for the CPU, to re-enter in backward."""
    states = []
    for kind in dict.fromkeys((device_type, "cpu")):
        if torch.amp.is_autocast_available(kind):
            states.append(
                {
                    "device_type": kind,
                    "enabled": torch.is_autocast_enabled(kind),
                    "dtype": torch.get_autocast_dtype(kind),
                    "cache_enabled": torch.is_autocast_cache_enabled(),
                }
            )
    return states


class _ReversibleChain(torch.autograd.Function):
    """Inputs: the chain's input, then every parameter of the units. Output: the chain's output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        prelude: Callable[[torch.Tensor], torch.Tensor] | None,
        units: Sequence[AdditiveCoupling],
        names: Sequence[str],
        check: ReconstructionCheck | None,
        parameter_counts: Sequence[int],
        *parameters: torch.Tensor,
    ) -> torch.Tensor:
        ctx.prelude, ctx.units, ctx.names, ctx.check = prelude, units, names, check
        ctx.parameter_counts = parameter_counts
        ctx.autocast_states = _autocast_states(x.device.type)
        ctx.random_states = []
        ctx.true_inputs = [] if check is not None else None
        with torch.no_grad():
            h = x if prelude is None else prelude(x)
            for index, unit in enumerate(units):
                ctx.random_states.append(_RandomState.capture(x.device))
                if check is not None and index > 0:
                    ctx.true_inputs.append(h.detach())
                h = unit(h)
        ctx.save_for_backward(x, h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, output = ctx.saved_tensors
        recompute_context = _RecomputeContext(ctx.autocast_states)
        # The current unit's output and its gradient as (first, second) channel halves, kept apart
        # so that no full-width tensor is assembled per unit.
        top, bottom = torch.chunk(output.detach(), 2, dim=1)
        grad_top, grad_bottom = torch.chunk(grad_output, 2, dim=1)
        counts = ctx.parameter_counts
        needs_parameter_grad = ctx.needs_input_grad[6:]
        parameter_grads: list[torch.Tensor | None] = []
        for index in reversed(range(len(ctx.units))):
            unit = ctx.units[index]
            start = sum(counts[:index])
            needed = needs_parameter_grad[start : start + counts[index]]
            wanted = [p for p, need in zip(unit.parameters(), needed) if need]
            if index == 0:
                # The first unit's input is recomputed from the chain's stored input, bit for bit,
                # rather than reconstructed: exact where exactness matters most, e.g. channels the
                # transition pads with zeros, whose BN output sits exactly on ReLU's kink. With a
                # graph through the prelude, kept for the input's gradient at the end.
                x_leaf = x.detach().requires_grad_(ctx.needs_input_grad[0] and ctx.prelude is not None)
                with recompute_context.with_grad() if x_leaf.requires_grad else recompute_context.without_grad():
                    first_input = _apply(ctx.prelude, x_leaf)
                exact_x1, exact_x2 = torch.chunk(first_input.detach(), 2, dim=1)
                top_for_f = exact_x2
            else:
                top_for_f = top
            # The unit's output is (x2, y1) with y1 = x1 + F(x2): recompute F(x2) with a graph.
            x2 = top_for_f.detach().requires_grad_(True)
            with ctx.random_states[index].replay(), recompute_context.with_grad(), batch_stats_without_update(unit.F):
                residual = unit.F(x2)
            with torch.no_grad():
                x1 = (bottom - residual).to(bottom.dtype)
            if ctx.check is not None:
                true = torch.chunk(ctx.true_inputs[index - 1], 2, dim=1) if index > 0 else (exact_x1, exact_x2)
                ctx.check.record(ctx.names[index], (x1, top), true, recompute_context.autocast_dtype)
            # d loss / d residual is d loss / d y1, in the residual's dtype as ordinary autograd's
            # addition would hand it back under autocast.
            grads = torch.autograd.grad(residual, [x2, *wanted], grad_outputs=grad_bottom.to(residual.dtype))
            del residual
            by_parameter = iter(grads[1:])
            parameter_grads[:0] = [next(by_parameter) if need else None for need in needed]
            top, bottom = x1, x2.detach()
            grad_top, grad_bottom = grad_bottom, grad_top + grads[0]
        ctx.true_inputs = None
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_first_input = torch.cat([grad_top, grad_bottom], dim=1)
            del grad_top, grad_bottom, top, bottom, exact_x1, exact_x2
            if ctx.prelude is None:
                grad_input = grad_first_input
            else:
                (grad_input,) = torch.autograd.grad(first_input, x_leaf, grad_outputs=grad_first_input)
        return (grad_input, None, None, None, None, None, *parameter_grads)


def _apply(prelude: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor) -> torch.Tensor:
    return x if prelude is None else prelude(x)


class _RecomputeContext:
    """The forward's autocast state, re-entered for recomputation in backward."""

    def __init__(self, autocast_states: list[dict[str, Any]]) -> None:
        self.autocast_states = autocast_states
        enabled = [state["dtype"] for state in autocast_states if state["enabled"]]
        self.autocast_dtype: torch.dtype | None = enabled[0] if enabled else None

    @contextlib.contextmanager
    def _autocast(self, grad: bool) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for state in self.autocast_states:
                stack.enter_context(torch.autocast(**state))
            stack.enter_context(torch.enable_grad() if grad else torch.no_grad())
            yield

    def with_grad(self) -> contextlib.AbstractContextManager:
        return self._autocast(grad=True)

    def without_grad(self) -> contextlib.AbstractContextManager:
        return self._autocast(grad=False)


def reversible_sequence(
    units: Sequence[AdditiveCoupling],
    x: torch.Tensor,
    *,
    prelude: Callable[[torch.Tensor], torch.Tensor] | None = None,
    names: Sequence[str] | None = None,
    check: ReconstructionCheck | None = None,
) -> torch.Tensor:
    """``units`` applied in order to ``prelude(x)`` (or ``x``), backpropagated by recomputation.

    Returns the same tensor as ``nn.Sequential(*units)(prelude(x))``; its gradients with respect
    to ``x`` and to every parameter of the units equal ordinary autograd's up to roundoff. For
    backward it keeps ``x`` and the output only. ``prelude`` is an optional weightless,
    deterministic step (RevNet: the pooling before a stage) that backward recomputes from ``x``
    for the first unit's exact input, so its own intermediates are not stored either.

    Without grad mode, or when neither ``x`` nor any parameter requires a gradient, it is the
    plain forward. ``names`` label the units in ``check``'s report (default ``unit1``, ...).
    """
    units = list(units)
    if not units:
        raise PretextlabError("reversible_sequence needs at least one reversible unit: got an empty sequence")
    if names is None:
        names = [f"unit{i + 1}" for i in range(len(units))]
    elif len(names) != len(units):
        raise PretextlabError(f"reversible_sequence got {len(names)} names for {len(units)} units: give one name per unit")
    if isinstance(prelude, nn.Module) and any(True for _ in prelude.parameters()):
        raise PretextlabError(
            f"reversible_sequence's prelude must be weightless (its gradient is recomputed), but "
            f"{type(prelude).__name__} has parameters: apply it before reversible_sequence instead"
        )
    parameters_by_unit = [list(unit.parameters()) for unit in units]
    parameters = [p for unit_parameters in parameters_by_unit for p in unit_parameters]
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in parameters)):
        x = _apply(prelude, x)
        for unit in units:
            x = unit(x)
        return x
    counts = [len(unit_parameters) for unit_parameters in parameters_by_unit]
    return _ReversibleChain.apply(x, prelude, units, list(names), check, counts, *parameters)
