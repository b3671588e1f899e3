"""A memory-lean backward for RevNet's stem: 7x7 convolution, then 3x3/2 max-pool over a zero-padded map.

Once the reversible stages keep only their inputs and outputs (reversible.py), the stem is what
ordinary autograd would make the largest store of a RevNet training step: the convolution's
output at half the input resolution (4x the stem output's size, 4.5x once zero-padded for the
pool) and the pool's int64 argmax indices (2x the output's size in bytes). ``lean_conv_max_pool``
computes the same function but keeps, for backward, only the input images and the pool's argmax
as a uint8 offset inside its 3x3 window (1/4 of the output's bytes): the convolution's weight
gradient needs the images and the gradient of the convolution's output, and that gradient is the
pool's output gradient scattered to the argmax positions.

Nothing is recomputed: the backward is the same work ordinary autograd does (scatter, then the
convolution's weight and input gradients). Forward and backward run over the batch in chunks,
so the full-resolution intermediates (convolution output, padded map, its gradient) never exist
for the whole batch at once; the stem has no BatchNorm, so each image's result is independent of
the chunking. Gradients equal ordinary autograd's up to the order of float additions.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as functional
from torch.autograd.function import once_differentiable

POOL_KERNEL = 3
POOL_STRIDE = 2
POOL_PADDING = 1  # zeros, as the released code's fixed_padding; a zero can win the max


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the convolution in (x's own outside autocast; float64 stays)."""
    device_type = x.device.type
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32) and torch.amp.is_autocast_available(device_type):
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    return x.dtype


def _chunk_size(batch: int, padded_plane: int, pooled_plane: int) -> int:
    """Images per chunk such that one chunk's padded full-resolution map is no larger than the
    whole batch's pooled output."""
    return max(1, min(batch, math.floor(batch * pooled_plane / padded_plane)))


def _window_origins(pooled_height: int, pooled_width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(pooled_height, device=device).mul_(POOL_STRIDE).view(-1, 1)
    columns = torch.arange(pooled_width, device=device).mul_(POOL_STRIDE).view(1, -1)
    return rows, columns


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _LeanConvMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:  # type: ignore[override]
        dtype = _compute_dtype(x)
        conv_height = (x.shape[2] + 2 * padding - weight.shape[2]) // stride + 1
        conv_width = (x.shape[3] + 2 * padding - weight.shape[3]) // stride + 1
        padded_height, padded_width = conv_height + 2 * POOL_PADDING, conv_width + 2 * POOL_PADDING
        pooled_height = (padded_height - POOL_KERNEL) // POOL_STRIDE + 1
        pooled_width = (padded_width - POOL_KERNEL) // POOL_STRIDE + 1
        chunk = _chunk_size(x.shape[0], padded_height * padded_width, pooled_height * pooled_width)
        rows, columns = _window_origins(pooled_height, pooled_width, x.device)
        outputs, offsets = [], []
        # The casts autocast would make, made here so that backward can make the same ones.
        with _autocast_off(x.device.type):
            wc = weight.to(dtype)
            for part in torch.split(x, chunk):
                conv = functional.conv2d(part.to(dtype), wc, stride=stride, padding=padding)
                padded = functional.pad(conv, (POOL_PADDING,) * 4)
                del conv
                pooled, indices = functional.max_pool2d(padded, POOL_KERNEL, POOL_STRIDE, return_indices=True)
                del padded
                # Flat index in the padded plane -> offset (0..8) inside the pooling window.
                row_in_window = torch.div(indices, padded_width, rounding_mode="floor").sub_(rows)
                column_in_window = indices.remainder_(padded_width).sub_(columns)
                offsets.append(row_in_window.mul_(POOL_KERNEL).add_(column_in_window).to(torch.uint8))
                outputs.append(pooled)
        ctx.save_for_backward(x, weight, torch.cat(offsets))
        ctx.geometry = (stride, padding, chunk, padded_height, padded_width)
        ctx.compute_dtype = dtype
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, offsets = ctx.saved_tensors
        stride, padding, chunk, padded_height, padded_width = ctx.geometry
        dtype = ctx.compute_dtype
        need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        accumulate = torch.promote_types(dtype, torch.float32)
        wc = weight.to(dtype)
        batch, channels, pooled_height, pooled_width = grad_output.shape
        rows, columns = _window_origins(pooled_height, pooled_width, grad_output.device)
        grad_weight = None
        grad_inputs = []
        for start in range(0, batch, chunk):
            stop = min(batch, start + chunk)
            offset = offsets[start:stop].long()
            flat = torch.div(offset, POOL_KERNEL, rounding_mode="floor").add_(rows).mul_(padded_width)
            flat.add_(offset.remainder_(POOL_KERNEL).add_(columns))
            del offset
            # Overlapping windows can send up to 4 gradients to one position: summed in at least
            # float32, then rounded once to the convolution's dtype.
            grad_padded = torch.zeros(
                (stop - start, channels, padded_height * padded_width), dtype=accumulate, device=grad_output.device
            )
            grad_padded.scatter_add_(
                2,
                flat.view(stop - start, channels, -1),
                grad_output[start:stop].to(accumulate).reshape(stop - start, channels, -1),
            )
            del flat
            grad_conv = grad_padded.view(stop - start, channels, padded_height, padded_width)[
                :, :, POOL_PADDING:-POOL_PADDING, POOL_PADDING:-POOL_PADDING
            ].to(dtype)
            part = x[start:stop].to(dtype)
            if need_weight:
                part_grad = torch.nn.grad.conv2d_weight(part, weight.shape, grad_conv, stride=stride, padding=padding)
                part_grad = part_grad.to(accumulate)
                grad_weight = part_grad if grad_weight is None else grad_weight.add_(part_grad)
            if need_input:
                grad_inputs.append(
                    torch.nn.grad.conv2d_input(part.shape, wc, grad_conv, stride=stride, padding=padding).to(x.dtype)
                )
            del grad_padded, grad_conv, part
        grad_x = torch.cat(grad_inputs) if need_input else None
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None


def lean_conv_max_pool(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> torch.Tensor:
    """``max_pool2d(pad(conv2d(x, weight, stride, padding), 1 zero each side), 3, 2)`` with the lean
    backward described above; under autocast the convolution runs in autocast's dtype, as
    ``conv2d`` would. Without grad mode (or with nothing requiring a gradient) it is the plain
    computation."""
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        conv = functional.conv2d(x, weight, stride=stride, padding=padding)
        return functional.max_pool2d(functional.pad(conv, (POOL_PADDING,) * 4), POOL_KERNEL, POOL_STRIDE)
    return _LeanConvMaxPool.apply(x, weight, stride, padding)
