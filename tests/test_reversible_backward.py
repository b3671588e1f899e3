"""RevNet's memory-saving backward (models/reversible.py) against ordinary autograd.

"Relative error" of a gradient below is per tensor: ||g - g_reference|| / ||g_reference|| (L2
norms over the whole tensor), for every parameter and for the input.

Exactness is checked in float64, where the reconstruction x1 = (x1 + F(x2)) - F(x2) is off by
~1e-16 and the gradients agree to 1e-11 (with ReLU, on several batches). Float32 is not compared
to ordinary float32 autograd with a tight tolerance: the recomputed activations differ from the
stored ones by roundoff (~1e-6 relative), and where a pre-activation lies within that of ReLU's
kink at 0 its derivative flips; in these tiny networks (batch 8, 2x2 maps in the last stage, BN
coupling every element of a channel) one flipped element moves many gradients by ~1%. Whether
that happens depends on the CPU's vectorisation (a fixed-seed test passed on one CPU and failed on
another at 6e-3). Ordinary float32 autograd suffers the same flips against the exact gradient.
So the float32 test runs F with a smooth activation (SiLU for ReLU, in both networks: the
recomputation does not care which), where roundoff propagates smoothly, and bounds the
reversible gradient's error against the float64 gradient by ordinary float32 autograd's own.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from forked_ranks import finish, forked_ranks
from pretextlab.data import fashion_mnist
from pretextlab.errors import PretextlabError
from pretextlab.models import build_network
from pretextlab.models.reversible import ReconstructionCheck, reversible_sequence
from pretextlab.models.revnet import ReversibleUnit, revnet50
from pretextlab.tasks.rotation import rotate_all

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="needs Fashion-MNIST: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="module")
def fashion() -> np.ndarray:
    """The first 512 Fashion-MNIST training images, uint8 (512, 28, 28)."""
    return fashion_mnist.read_fashion_mnist(FASHION_DIR).train_images[:512]


def _images(fashion: np.ndarray, count: int, side: int, dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
    """``count`` real images from ``offset`` on, resized to ``side``, gray in 3 channels, in [-1, 1]."""
    gray = fashion_mnist.resize_gray(fashion[offset : offset + count], side).double() / 127.5 - 1.0
    return gray.expand(-1, 3, -1, -1).contiguous().to(dtype)


def _pair(width: int, patch_mode: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0, **options):
    """The same RevNet twice, with the memory-saving backward and without, in train mode."""
    torch.manual_seed(seed)
    ordinary = build_network("revnet50", width=width, patch_mode=patch_mode, reversible_backward=False, **options)
    reversible = build_network("revnet50", width=width, patch_mode=patch_mode, reversible_backward=True, **options)
    reversible.load_state_dict(ordinary.state_dict())
    return ordinary.to(dtype).train(), reversible.to(dtype).train()


def _gradients(network: nn.Module, images: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of a loss that reads pre_logits and every named block output, so gradient flows
    into the stage outputs both from downstream and directly."""
    network.zero_grad(set_to_none=True)
    images = images.clone().requires_grad_(True)
    outputs = network(images)
    loss = (outputs["pre_logits"] * weights).sum()
    for index in range(1, 5):
        block = outputs[f"block{index}"]
        loss = loss + 0.1 * index * block.pow(2).mean() + block[:, : block.shape[1] // 3].mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in network.named_parameters()}
    grads["input"] = images.grad.clone()
    return grads


def _inputs(
    fashion: np.ndarray, width: int, side: int, batch: int, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of real images (a different one per seed) and random loss weights on pre_logits."""
    generator = torch.Generator().manual_seed(seed + 100)
    weights = torch.randn(batch, 512 * width, generator=generator, dtype=torch.float64)
    return _images(fashion, batch, side, dtype, offset=seed * batch), weights.to(dtype)


def _assert_relatively_close(got: torch.Tensor, expected: torch.Tensor, tolerance: float, name: str) -> None:
    error = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert error < tolerance, (name, error)


def _relative_errors(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    assert got.keys() == reference.keys()
    return {k: ((got[k].double() - reference[k].double()).norm() / reference[k].double().norm()).item() for k in reference}


# ---------------------------------------------------------------- gradients


def _with_smooth_activations(network: nn.Module) -> nn.Module:
    """Every ReLU replaced by SiLU, which is smooth at 0 (see the module doc)."""
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
    return network


# Bound on the reversible float32 gradient's error against the float64 one, relative to ordinary
# float32 autograd's error on the same tensor. Both run the same float32 forward, whose roundoff
# (u = 6e-8 per operation, compounded over ~50 layers) is what separates them from float64; the
# reversible backward adds the reconstruction's roundoff, of the same order (a few ulps per unit,
# which ReconstructionCheck measures below 1e-5). In a smooth network both errors are linear in
# these perturbations, so the ratio is O(1): measured 1.02-1.18 over 12 cases (4 configurations x
# 3 seeds) at 1 and 2 threads. The floor (16 u) covers a tensor whose ordinary gradient happens to
# be almost exact. A real fault (a wrong recomputation, a gradient lost) is off by O(1).
FLOAT32_ERROR_FACTOR = 2.0
FLOAT32_ERROR_FLOOR = 16 * torch.finfo(torch.float32).eps / 2


@pytest.mark.parametrize(
    "width,patch_mode,side",
    [(1, False, 64), (2, False, 64), (1, True, 32), (2, True, 32)],
    ids=["k1-image64", "k2-image64", "k1-patch32", "k2-patch32"],
)
def test_float32_gradients_are_as_accurate_as_ordinary_autograd(fashion, width, patch_mode, side):
    ordinary, reversible = (_with_smooth_activations(n) for n in _pair(width, patch_mode))
    exact = _with_smooth_activations(_pair(width, patch_mode)[0])
    exact.load_state_dict(ordinary.state_dict())  # the same float32 weights, exactly, in float64
    exact.double()
    images, weights = _inputs(fashion, width, side, batch=8, dtype=torch.float32, seed=0)
    reference = _gradients(exact, images.double(), weights.double())
    ordinary_errors = _relative_errors(_gradients(ordinary, images, weights), reference)
    reversible_errors = _relative_errors(_gradients(reversible, images, weights), reference)
    assert len(reversible_errors) == len(list(ordinary.parameters())) + 1
    # The comparison means something: float32 is close to exact here (measured <= 3.1e-4).
    assert max(ordinary_errors.values()) < 1e-3, max(ordinary_errors.items(), key=lambda item: item[1])
    bounds = {k: FLOAT32_ERROR_FACTOR * e + FLOAT32_ERROR_FLOOR for k, e in ordinary_errors.items()}
    beyond = {k: (reversible_errors[k], ordinary_errors[k]) for k in bounds if reversible_errors[k] > bounds[k]}
    assert not beyond, beyond


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("patch_mode", [False, True], ids=["image", "patch"])
def test_float64_gradients_match_ordinary_autograd_to_roundoff(fashion, patch_mode, seed):
    ordinary, reversible = _pair(1, patch_mode, torch.float64, seed=seed)
    images, weights = _inputs(fashion, 1, 32, batch=4, dtype=torch.float64, seed=seed)
    errors = _relative_errors(_gradients(reversible, images, weights), _gradients(ordinary, images, weights))
    assert max(errors.values()) < 1e-11, max(errors.items(), key=lambda item: item[1])


def test_gradient_into_a_named_block_output_alone_is_correct(fashion):
    # block2 is read only by the loss: its gradient must pass through the chain of stage 2 (and
    # only that way: stages 3 and 4 receive none).
    ordinary, reversible = _pair(1, dtype=torch.float64)
    images = _images(fashion, 4, 32, torch.float64)
    results = []
    for network in (ordinary, reversible):
        network.zero_grad(set_to_none=True)
        network(images)["block2"].pow(3).mean().backward()
        results.append({n: p.grad for n, p in network.named_parameters()})
    for name, grad in results[0].items():
        if name.startswith(("stages.2", "stages.3", "final_bn")):
            assert grad is None and results[1][name] is None, name
        else:
            _assert_relatively_close(results[1][name], grad, 1e-11, name)


def test_running_statistics_after_one_step_equal_ordinary_training(fashion):
    # Float64, and equal to roundoff rather than bitwise: the two modes' stems convolve in
    # different batch chunks (lean_stem.py), which float32 kernels may round differently on
    # some CPUs. A second update by the recomputation would move a mean by ~10%.
    ordinary, reversible = _pair(2, dtype=torch.float64)
    images, weights = _inputs(fashion, 2, 64, batch=8, dtype=torch.float64, seed=3)
    _gradients(ordinary, images, weights)
    _gradients(reversible, images, weights)
    buffers = {name: value for name, value in ordinary.named_buffers()}
    assert len(buffers) == 3 * (3 * 16 + 1)  # three BN layers per unit, one final BN
    for name, value in reversible.named_buffers():
        # the forward updates them, once, identically
        torch.testing.assert_close(value, buffers[name], rtol=1e-12, atol=1e-14, msg=name)
    counts = {int(v) for n, v in reversible.named_buffers() if n.endswith("num_batches_tracked")}
    assert counts == {1}
    moved = reversible.stages[3][2].F.bn2.running_mean
    assert moved.abs().sum() > 0  # the statistics did move


def test_sgd_training_with_and_without_the_option_follows_the_same_loss_curve(fashion):
    # Rotation prediction on 8 real Fashion-MNIST images (32 inputs), 6 momentum SGD steps, in
    # float64: training this small net is chaotic, so float32 roundoff alone (a 1e-7 nudge of one
    # weight, the third run below) moves the loss by percents within a few steps, in either mode.
    inputs, targets = rotate_all(_images(fashion, 8, 32, torch.float64))
    ordinary, reversible = _pair(1, dtype=torch.float64)
    nudged = _pair(1, dtype=torch.float64)[0]
    with torch.no_grad():
        nudged.stem.conv.weight.mul_(1 + 1e-7)
    curves, initial, final = [], [], []
    for network in (ordinary, reversible, nudged):
        torch.manual_seed(11)
        head = nn.Linear(network.out_dim, 4).double()
        parameters = list(network.parameters()) + list(head.parameters())
        initial.append(torch.cat([p.detach().flatten() for p in parameters]))
        optimizer = torch.optim.SGD(parameters, lr=0.05, momentum=0.9, weight_decay=1e-4)
        losses = []
        for _ in range(6):
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(head(network(inputs)["pre_logits"]), targets)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses, dtype=torch.float64))
        final.append(torch.cat([p.detach().flatten() for p in parameters]))
    ordinary_curve, reversible_curve, nudged_curve = curves
    assert torch.equal(initial[0], initial[1])
    assert ordinary_curve[-1] < 0.8 * ordinary_curve[0]  # it learns
    torch.testing.assert_close(reversible_curve, ordinary_curve, rtol=1e-9, atol=0)
    assert (nudged_curve - ordinary_curve).abs().max() > 1e-4 * ordinary_curve.max()  # the control is sensitive
    # The weights moved the same way: the runs differ by roundoff next to how far they moved.
    assert (final[1] - final[0]).norm() < 1e-9 * (final[0] - initial[0]).norm()


# ---------------------------------------------------------------- randomness, precision, check


def _with_dropout_in_every_f(network: nn.Module) -> None:
    for stage in network.stages:
        for unit in stage:
            unit.F.conv2 = nn.Sequential(nn.Dropout(0.3), unit.F.conv2)


def test_dropout_inside_f_is_replayed_with_the_same_random_state(fashion):
    ordinary, reversible = _pair(1, dtype=torch.float64)
    _with_dropout_in_every_f(ordinary)
    _with_dropout_in_every_f(reversible)
    images, weights = _inputs(fashion, 1, 32, batch=4, dtype=torch.float64, seed=5)
    results, after = [], []
    for network in (ordinary, reversible):
        torch.manual_seed(123)
        results.append(_gradients(network, images, weights))
        after.append(torch.rand(3))  # the caller's random stream continues as without recomputation
    errors = _relative_errors(results[1], results[0])
    assert max(errors.values()) < 1e-11, max(errors.items(), key=lambda item: item[1])
    assert torch.equal(after[0], after[1])
    # Different seeds give different masks, so the agreement above is not an accident of dropout
    # being inactive.
    torch.manual_seed(124)
    assert _relative_errors(_gradients(ordinary, images, weights), results[0])["stages.0.0.F.conv2.1.weight"] > 1e-3


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_autocast_recomputes_in_bf16_and_stays_within_bf16_noise(fashion, seed):
    ordinary, reversible = _pair(1, seed=seed)
    reversible.reversible_check = ReconstructionCheck()
    images, weights = _inputs(fashion, 1, 64, batch=8, dtype=torch.float32, seed=seed)
    grads = {}
    for label, network, precision in (
        ("ordinary", ordinary, torch.bfloat16),
        ("reversible", reversible, torch.bfloat16),
        ("ordinary float32", ordinary, None),
    ):
        network.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision is not None):
            outputs = network(images)
            loss = (outputs["pre_logits"].float() * weights).sum()
        # The residual stream stays float32 under autocast (bf16 would lose digits per unit).
        assert {v.dtype for v in outputs.values()} == {torch.float32}
        loss.backward()  # outside autocast, as training does: the recomputation re-enters it
        grads[label] = torch.cat([p.grad.flatten() for p in network.parameters()])
    errors = reversible.reversible_check.errors
    assert len(errors) == 16
    # The last unit of a stage recomputes its bf16 F from the stored output, so its input comes
    # back to float32 roundoff; recomputed in float32 instead it would be off by bf16's rounding
    # of F (~2.5e-3 measured). Earlier units differ where bf16 roundings flip: within the default
    # bf16 tolerance, so no warning.
    for last in ("block1.unit3", "block2.unit4", "block3.unit6", "block4.unit3"):
        assert errors[last] < 1e-7, (last, errors[last])
    assert reversible.reversible_check.worst < reversible.reversible_check.tolerance_for(torch.bfloat16)
    # bf16 itself moves this tiny net's gradients a lot from float32's; the reversible backward
    # moves them far less from ordinary bf16 autograd's (measured over four seeds: 1.5-17%,
    # against 95-190% for bf16 itself, and 33-52% when backward did not re-enter autocast).
    scale = grads["ordinary"].norm()
    reversible_shift = (grads["reversible"] - grads["ordinary"]).norm() / scale
    bf16_shift = (grads["ordinary float32"] - grads["ordinary"]).norm() / scale
    assert reversible_shift < 0.25 * bf16_shift, (reversible_shift, bf16_shift)


def test_reconstruction_check_measures_float32_error_and_stays_quiet(fashion):
    network = build_network("revnet50", width=1, reversible_check=True).train()
    images = _images(fashion, 4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network(images)["pre_logits"].sum().backward()
    errors = network.reversible_check.errors
    assert sorted(errors) == sorted(f"block{s + 1}.unit{u + 1}" for s, n in enumerate((3, 4, 6, 3)) for u in range(n))
    assert 0 < network.reversible_check.worst < 1e-5
    assert errors["block4.unit3"] < 1e-7  # recomputed from the exact stage output


def test_reconstruction_check_warns_when_the_inverse_loses_precision(fashion):
    # F's output 1e7 times the size of x1: y1 = x1 + F(x2) keeps only a few bits of x1 in float32,
    # so x1 = y1 - F(x2) cannot be recovered. The check names the unit.
    torch.manual_seed(2)
    network = build_network("revnet50", width=1).train()
    network.reversible_check = ReconstructionCheck(tolerance=1e-3)
    with torch.no_grad():
        network.stages[1][2].F.bn3.weight.fill_(1e7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        network(_images(fashion, 4, 32))["pre_logits"].sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert messages and re.match(r"reversible backward: the input of block2\.unit3 was recomputed with relative error .*tolerance 0\.001", messages[0])
    # The lost digits propagate to the units before it, and only to those.
    assert {re.search(r"input of (\S+) was", m).group(1) for m in messages} <= {"block2.unit3", "block2.unit2", "block2.unit1"}
    assert network.reversible_check.errors["block2.unit3"] > 1e-3
    assert network.reversible_check.errors["block4.unit3"] < 1e-3


# ---------------------------------------------------------------- memory


def _saved_activation_bytes(network: nn.Module, images: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = network(images)
    del outputs
    return sum(storages.values())


def test_saved_activations_stay_flat_as_depth_grows(fashion):
    images = _images(fashion, 4, 64)
    saved = {}
    for units in ((3, 4, 6, 3), (6, 8, 12, 6)):
        for reversible in (False, True):
            torch.manual_seed(0)
            network = revnet50(1, units_per_stage=units, reversible_backward=reversible).train()
            saved[units, reversible] = _saved_activation_bytes(network, images)
    assert saved[(6, 8, 12, 6), True] == saved[(3, 4, 6, 3), True]
    assert saved[(6, 8, 12, 6), False] > 1.5 * saved[(3, 4, 6, 3), False]  # measured 1.6 (5.7 -> 9.2 MiB)
    # The stages keep their inputs and outputs, the stem (lean_stem.py) the images and uint8 offsets.
    assert saved[(3, 4, 6, 3), True] < saved[(3, 4, 6, 3), False] / 4  # measured 1.0 against 5.8 MiB


def test_deeper_revnets_are_named_by_depth_and_invert(fashion):
    network = revnet50(1, units_per_stage=(1, 2, 3, 1))
    assert network.name == "revnet23" and [len(s) for s in network.stages] == [1, 2, 3, 1]
    assert revnet50(1).name == "revnet50"
    ordinary = revnet50(1, units_per_stage=(1, 2, 3, 1), reversible_backward=False).double().train()
    ordinary.load_state_dict(network.state_dict())
    images = _images(fashion, 2, 32, torch.float64)
    weights = torch.randn(2, 512, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors = _relative_errors(_gradients(network.double().train(), images, weights), _gradients(ordinary, images, weights))
    assert max(errors.values()) < 1e-11


# ---------------------------------------------------------------- options and the plain forward


def test_default_is_on_and_eval_or_no_grad_runs_the_plain_forward(fashion):
    network = build_network("revnet50", width=1)
    assert network.reversible_backward is True and network.reversible_check is None
    ordinary, reversible = _pair(1)
    images = _images(fashion, 2, 32)
    with torch.no_grad():
        for mode in (True, False):
            ordinary.train(mode)
            reversible.train(mode)
            expected, got = ordinary(images), reversible(images)
            for name in expected:
                assert torch.equal(got[name], expected[name]), name
            assert got["block1"].grad_fn is None


def test_frozen_parameters_get_no_gradient_and_the_rest_still_match(fashion):
    ordinary, reversible = _pair(1, dtype=torch.float64)
    for network in (ordinary, reversible):
        for unit in network.stages[2]:
            unit.requires_grad_(False)
    images, weights = _inputs(fashion, 1, 32, batch=4, dtype=torch.float64, seed=4)
    results = []
    for network in (ordinary, reversible):
        network.zero_grad(set_to_none=True)
        (network(images)["pre_logits"] * weights).sum().backward()
        results.append({n: p.grad for n, p in network.named_parameters()})
    for name, grad in results[0].items():
        if name.startswith("stages.2."):
            assert grad is None and results[1][name] is None
        else:
            _assert_relatively_close(results[1][name], grad, 1e-11, name)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"name": "resnet50v2", "reversible_backward": True}, r"reversible_backward=True is for networks of reversible units \(revnet50\), not resnet50v2"),
        ({"name": "vgg19bn", "reversible_check": True}, r"reversible_check=True is for .* not vgg19bn"),
        ({"name": "revnet50", "reversible_backward": "yes"}, r"reversible_backward must be True or False, got 'yes'"),
    ],
)
def test_bad_build_options(kwargs, message):
    with pytest.raises(PretextlabError, match=message):
        build_network(width=1, **kwargs)


def test_other_networks_accept_the_option_switched_off():
    assert build_network("resnet50v1", width=1, reversible_backward=False).name == "resnet50v1"


@pytest.mark.parametrize("units", [(3, 4, 6), (3, 0, 6, 3), (3, 4.5, 6, 3), 5])
def test_bad_units_per_stage(units):
    with pytest.raises(PretextlabError, match=r"units_per_stage must be 4 whole numbers >= 1 .* \(3, 4, 6, 3\)"):
        revnet50(1, units_per_stage=units)


@pytest.mark.parametrize("tolerance", [0, -1e-3, float("nan"), "1e-3"])
def test_bad_check_tolerance(tolerance):
    with pytest.raises(PretextlabError, match="tolerance must be a positive finite number"):
        ReconstructionCheck(tolerance=tolerance)


def test_reversible_sequence_rejects_empty_chains_mismatched_names_and_weighted_preludes():
    unit = ReversibleUnit(8)
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(PretextlabError, match="at least one reversible unit"):
        reversible_sequence([], x)
    with pytest.raises(PretextlabError, match="got 2 names for 1 units"):
        reversible_sequence([unit], x, names=["a", "b"])
    with pytest.raises(PretextlabError, match="prelude must be weightless .* Conv2d has parameters"):
        reversible_sequence([unit], x, prelude=nn.Conv2d(8, 8, 1))


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world_size: int, rendezvous: str, out_dir: str, fashion: np.ndarray) -> None:
    """One rank: the same batch-split step through DDP with and without the reversible backward,
    recording which parameters each gradient bucket carried to the all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        results = {}
        for reversible in (False, True):
            torch.manual_seed(0)
            network = build_network("revnet50", width=1, reversible_backward=reversible).double().train()
            names = {id(p): n for n, p in network.named_parameters()}
            reduced: list[str] = []

            def counting_allreduce(state, bucket, reduced=reduced, names=names):
                reduced.extend(names[id(p)] for p in bucket.parameters())
                return default_hooks.allreduce_hook(state, bucket)

            model = DistributedDataParallel(network)
            model.register_comm_hook(dist.group.WORLD, counting_allreduce)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            generator = torch.Generator().manual_seed(10 + rank)
            counts, losses = [], []
            for step in range(2):  # the second step runs with DDP's rebuilt buckets
                # Each rank its own half-batch of real images.
                images = _images(fashion, 4, 32, torch.float64, offset=8 * step + 4 * rank)
                weights = torch.randn(4, 512, generator=generator, dtype=torch.float64)
                optimizer.zero_grad(set_to_none=True)
                reduced.clear()
                loss = (model(images)["pre_logits"] * weights).sum()
                loss.backward()
                counts.append({name: reduced.count(name) for name in names.values()})
                grads = {n: p.grad.clone() for n, p in network.named_parameters()}
                optimizer.step()
                losses.append(loss.item())
            results[reversible] = {"counts": counts, "grads": grads, "losses": losses,
                                   "weights": {n: p.detach().clone() for n, p in network.named_parameters()}}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_reduces_each_gradient_once_and_matches_ordinary_ddp(fashion, tmp_path):
    # The ranks are forked from this process (tests/forked_ranks.py): no interpreter start-up each.
    ranks = forked_ranks(lambda rank: _ddp_worker(rank, 2, str(tmp_path / "rendezvous"), str(tmp_path), fashion[:16]))
    errors = [err for _, err in finish(ranks)]
    assert [rank.returncode for rank in ranks] == [0, 0], [err[-3000:] for err in errors]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank in ranks:
        ordinary, reversible = rank[False], rank[True]
        for counts in ordinary["counts"] + reversible["counts"]:
            assert set(counts.values()) == {1}  # every parameter's gradient reduced exactly once per step
        assert len(reversible["counts"][0]) == 16 * (3 + 3 * 2) + 2 + 1  # units' convs and BN affines, final BN, stem
        for name, grad in ordinary["grads"].items():
            _assert_relatively_close(reversible["grads"][name], grad, 1e-11, name)
        torch.testing.assert_close(torch.tensor(reversible["losses"]), torch.tensor(ordinary["losses"]), rtol=1e-10, atol=0)
    # The all-reduce averaged the ranks' different half-batches: same weights on both ranks (BN's
    # running statistics are per rank without SyncBatchNorm, so only parameters are compared).
    for name, value in ranks[0][True]["weights"].items():
        torch.testing.assert_close(ranks[1][True]["weights"][name], value, rtol=0, atol=0, msg=name)
    assert ranks[0][True]["losses"] != ranks[1][True]["losses"]
