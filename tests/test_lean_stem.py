"""The RevNet stem's lean backward (lean_stem.py) against ordinary autograd, on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as functional

from pretextlab.data import fashion_mnist
from pretextlab.models.lean_stem import lean_conv_max_pool
from pretextlab.models.revnet import revnet50

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    return fashion_mnist.read_fashion_mnist(FASHION_DIR).train_images[:64]


def _images(fashion: np.ndarray, count: int, side: int, dtype: torch.dtype) -> torch.Tensor:
    gray = fashion_mnist.resize_gray(fashion[:count], side).double() / 127.5 - 1.0
    # Three different channels, so the kernel's channels are not interchangeable.
    return torch.cat([gray, gray.flip(-1), -gray], dim=1).to(dtype)


def _ordinary(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    conv = functional.conv2d(x, weight, stride=stride, padding=3)
    return functional.max_pool2d(functional.pad(conv, (1, 1, 1, 1)), 3, 2)


def _both(x: torch.Tensor, weight: torch.Tensor, stride: int, seed: int = 0):
    """Outputs and (input, weight) gradients of the ordinary and the lean stem for one random loss."""
    results = []
    for function in (_ordinary, lambda a, b, s: lean_conv_max_pool(a, b, s, 3)):
        a, b = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = function(a, b, stride)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
        results.append((out.detach(), *torch.autograd.grad(out, [a, b], g)))
    return results


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


CASES = pytest.mark.parametrize(
    "count,side,stride,channels_last",
    [(16, 64, 2, False), (5, 33, 2, False), (7, 32, 1, False), (1, 64, 2, False), (16, 64, 2, True)],
    ids=["batch16-64px", "odd-size", "patch-stride1", "one-image", "channels-last"],
)


def _case(fashion, count, side, channels_last, dtype):
    x = _images(fashion, count, side, dtype)
    weight = torch.randn(24, 3, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, weight


@CASES
def test_float64_same_output_and_gradients_as_ordinary_autograd(fashion, count, side, stride, channels_last):
    # Float64 convolutions compute each image on its own (no oneDNN), so the lean stem's batch
    # chunks give bitwise the same map, the same argmax, and gradients equal up to summation order.
    x, weight = _case(fashion, count, side, channels_last, torch.float64)
    (out, grad_x, grad_w), (lean_out, lean_grad_x, lean_grad_w) = _both(x, weight, stride)
    assert lean_out.shape == out.shape and torch.equal(lean_out, out)  # same ops, same argmax
    assert lean_grad_x.dtype == lean_grad_w.dtype == torch.float64
    assert _relative(lean_grad_x, grad_x) < 1e-13
    assert _relative(lean_grad_w, grad_w) < 1e-13


def _gamma(terms: int) -> float:
    """Higham's gamma_n = n u / (1 - n u) for float32: |fl(sum of n products) - exact| <= gamma_n
    times the sum of the products' magnitudes, in any summation order (Accuracy and Stability of
    Numerical Algorithms, 2nd ed., eq. 3.5)."""
    u = torch.finfo(torch.float32).eps / 2
    return terms * u / (1 - terms * u)


@CASES
def test_float32_output_and_gradients_are_within_roundoff_bounds_of_the_exact_ones(fashion, count, side, stride, channels_last):
    # In float32 the stem's batch chunks may be convolved by other kernels than the whole batch
    # (oneDNN picks by shape and CPU), so values may differ by roundoff and a near-tie in a pool
    # window may pick another argmax: neither bitwise equality with ordinary autograd nor a fixed
    # tolerance on the gradient holds on every CPU. What holds everywhere: the output is within the
    # dot products' worst-case roundoff of the exact (float64) map, and the gradients within it of
    # the exact gradient of the lean stem's own selection (the argmax offsets it saved).
    x, weight = _case(fashion, count, side, channels_last, torch.float32)
    a, b = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = lean_conv_max_pool(a, b, stride, 3)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    offsets = out.grad_fn.saved_tensors[2].long()  # read before backward frees them
    grad_x, grad_w = torch.autograd.grad(out, [a, b], g)
    assert grad_x.dtype == grad_w.dtype == torch.float32

    # The exact map, the worst-case roundoff of each of its 3 x 7 x 7-term dot products, and the
    # selection the lean stem made, as flat indices into the zero-padded map.
    xd, wd = x.double().requires_grad_(True), weight.double().requires_grad_(True)
    padded = functional.pad(functional.conv2d(xd, wd, stride=stride, padding=3), (1, 1, 1, 1))
    bound_map = _gamma(weight[0].numel()) * functional.pad(
        functional.conv2d(x.double().abs(), weight.double().abs(), stride=stride, padding=3), (1, 1, 1, 1)
    )
    pooled_height, pooled_width = out.shape[-2:]
    rows = torch.arange(pooled_height).mul(2).view(-1, 1)
    columns = torch.arange(pooled_width).mul(2).view(1, -1)
    selected = (offsets // 3 + rows) * padded.shape[-1] + offsets % 3 + columns
    # A max moves by at most the largest change in its window: compare with the exact max.
    exact_max = functional.max_pool2d(padded.detach(), 3, 2)
    assert ((out.double() - exact_max).abs() <= functional.max_pool2d(bound_map, 3, 2)).all()
    # The selection is a maximum of the float32 map: the exact value there is within its bound.
    chosen = padded.detach().flatten(2).gather(2, selected.flatten(2)).view(out.shape)
    assert ((chosen - exact_max).abs() <= 2 * functional.max_pool2d(bound_map, 3, 2)).all()

    exact_x, exact_w = torch.autograd.grad(padded.flatten(2).gather(2, selected.flatten(2)), [xd, wd], g.double().flatten(2))
    # Gradient of the map: |g| scattered to the selected positions (up to 4 windows share one,
    # summed in float32: 3 more roundings); then each gradient is a sum of products with it.
    scattered = torch.zeros_like(padded).flatten(2).scatter_add_(2, selected.flatten(2), g.double().abs().flatten(2))
    grad_map = scattered.view(padded.shape)[..., 1:-1, 1:-1]
    weight_terms = x.shape[0] * grad_map.shape[-2] * grad_map.shape[-1] + 3
    input_terms = weight.shape[0] * 7 * 7 + 3
    bound_w = _gamma(weight_terms) * torch.nn.grad.conv2d_weight(x.double().abs(), weight.shape, grad_map, stride=stride, padding=3)
    bound_x = _gamma(input_terms) * torch.nn.grad.conv2d_input(x.shape, weight.double().abs(), grad_map, stride=stride, padding=3)
    assert ((grad_w.double() - exact_w).abs() <= bound_w).all()
    assert ((grad_x.double() - exact_x).abs() <= bound_x).all()
    # The bounds are tight enough to mean something: the typical error is far below them, and
    # far below what a gradient sent to a wrong position (a whole term) would cost.
    assert _relative(grad_x, exact_x) < 1e-5 and _relative(grad_w, exact_w) < 1e-5


def test_zero_padding_wins_the_max_where_the_map_is_negative(fashion):
    """The pool runs over zeros, as the released code: where a whole window is negative a padded
    zero is the max and takes the gradient, which must then go nowhere."""
    x = _images(fashion, 4, 32, torch.float64)
    weight = -torch.ones(8, 3, 7, 7, dtype=torch.float64)  # mostly negative responses
    (out, grad_x, grad_w), (lean_out, lean_grad_x, lean_grad_w) = _both(x, weight, 2)
    assert (out[..., 0, :] == 0).any()  # the padded border won somewhere
    assert torch.equal(lean_out, out)
    assert _relative(lean_grad_x, grad_x) < 1e-13 and _relative(lean_grad_w, grad_w) < 1e-13


def test_bf16_autocast_is_no_less_accurate_than_ordinary_autocast(fashion):
    x = _images(fashion, 16, 64, torch.float32)
    weight = torch.randn(32, 3, 7, 7, generator=torch.Generator().manual_seed(2))
    g = torch.randn(16, 32, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # Ordinary autocast: its selection is the bf16 map's argmax.
    ordinary_out, grad_x, grad_w = _both_under_autocast(x, weight, _ordinary, g)
    _, ordinary_selected = functional.max_pool2d(
        functional.pad(functional.conv2d(x.bfloat16(), weight.bfloat16(), stride=2, padding=3), (1, 1, 1, 1)),
        3, 2, return_indices=True,
    )
    # The lean stem: its selection is the offsets it saved.
    a, b = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean_out = lean_conv_max_pool(a, b, 2, 3)
    offsets = lean_out.grad_fn.saved_tensors[2].long()
    lean_grad_x, lean_grad_w = torch.autograd.grad(lean_out, [a, b], g.to(lean_out.dtype))
    rows, columns = torch.arange(16).mul(2).view(-1, 1), torch.arange(16).mul(2).view(1, -1)
    lean_selected = (offsets // 3 + rows) * 34 + offsets % 3 + columns
    assert lean_out.dtype == ordinary_out.dtype == torch.bfloat16 and lean_grad_x.dtype == lean_grad_w.dtype == torch.float32
    # Both accumulate in float32 and round once to bf16; batch chunks may accumulate in another
    # order (other oneDNN kernels), so the outputs agree to one bf16 ulp (<= 2^-7 relative), not bitwise.
    assert ((lean_out.float() - ordinary_out.float()).abs() <= 2**-7 * ordinary_out.float().abs()).all()
    # Each against the exact (float64) gradient of the piecewise-linear map it selected.
    exact_x, exact_w = _exact_gradients(x, weight, ordinary_selected, g.bfloat16().double())
    lean_exact_x, lean_exact_w = _exact_gradients(x, weight, lean_selected, g.bfloat16().double())
    # Measured: ordinary 5.1e-3 / 4.3e-3, lean 5.0e-3 / 2.7e-3 (bf16's epsilon is 7.8e-3); both
    # are bf16 roundings of the same operands, so the lean stem is allowed a quarter more, no more.
    assert _relative(lean_grad_x, lean_exact_x) <= 1.25 * _relative(grad_x, exact_x)
    assert _relative(lean_grad_w, lean_exact_w) <= 1.25 * _relative(grad_w, exact_w)


def _exact_gradients(x, weight, selected, g):
    """Float64 gradients of conv -> zero pad -> the values at ``selected`` (flat padded indices)."""
    xd, wd = x.double().requires_grad_(True), weight.double().requires_grad_(True)
    padded = functional.pad(functional.conv2d(xd, wd, stride=2, padding=3), (1, 1, 1, 1))
    return torch.autograd.grad(padded.flatten(2).gather(2, selected.flatten(2)), [xd, wd], g.flatten(2))


def _both_under_autocast(x, weight, function, g):
    a, b = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = function(a, b, 2)
    return (out, *torch.autograd.grad(out, [a, b], g.to(out.dtype)))


def test_keeps_only_the_images_and_uint8_window_offsets(fashion):
    x = _images(fashion, 16, 64, torch.float32)
    weight = torch.randn(64, 3, 7, 7, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = lean_conv_max_pool(x, weight, 2, 3)
    activations = [t for t in saved if t.data_ptr() not in (x.data_ptr(), weight.data_ptr())]
    assert [(t.dtype, t.shape) for t in activations] == [(torch.uint8, out.shape)]
    assert int(activations[0].max()) <= 8  # an offset inside the 3x3 window
    # Ordinary autograd keeps the padded 32x32 convolution output and int64 indices instead.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _ordinary(x, weight, 2)
    ordinary_bytes = sum(t.untyped_storage().nbytes() for t in saved if t.data_ptr() != x.data_ptr() and t.data_ptr() != weight.data_ptr())
    assert ordinary_bytes > 20 * activations[0].nbytes


def test_revnet_uses_it_only_with_the_reversible_backward(fashion):
    x = _images(fashion, 8, 64, torch.float32)
    for reversible in (True, False):
        network = revnet50(1, reversible_backward=reversible).train()
        dtypes: set[torch.dtype] = set()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: dtypes.add(t.dtype) or t, lambda t: t):
            network(x)
        # The pool's int64 indices are kept by ordinary autograd only; the offsets by the lean stem only.
        assert (torch.int64 in dtypes) == (not reversible)
        assert (torch.uint8 in dtypes) == reversible
    with torch.no_grad():  # plain computation, no graph, same numbers
        network = revnet50(1).eval()
        assert torch.equal(network.stem(x, lean=True), network.stem(x))
