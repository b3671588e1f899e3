"""Exemplar: the semi-hard triplet loss against a brute-force reference, retrieval accuracy, and the
augmented copies (shared gray decision, independent crops) on real Fashion-MNIST images."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from pretextlab.data import augment
from pretextlab.errors import PretextlabError
from pretextlab.tasks import build_task
from pretextlab.tasks.exemplar import ExemplarOptions, ExemplarTask
from pretextlab.tasks.triplet import l2_normalize, nearest_neighbour_correct, triplet_semihard_loss

FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _reference_triplet_loss(embeddings: torch.Tensor, labels: list[int], margin: float) -> torch.Tensor:
    """TF's triplet_semihard_loss written out with loops over anchors, positives and negatives."""
    n = len(labels)

    def distance(i: int, j: int) -> torch.Tensor:
        if i == j:
            return embeddings[i].sum() * 0.0
        return ((embeddings[i] - embeddings[j]) ** 2).sum()

    total, pairs = embeddings.sum() * 0.0, 0
    for a in range(n):
        negatives = [k for k in range(n) if labels[k] != labels[a]]
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            d_ap = distance(a, p)
            farther = [distance(a, k) for k in negatives if distance(a, k).item() > d_ap.item()]
            if farther:
                d_an = min(farther, key=lambda d: d.item())
            elif negatives:
                d_an = max((distance(a, k) for k in negatives), key=lambda d: d.item())
            else:
                d_an = embeddings.sum() * 0.0
            total = total + torch.clamp(margin + d_ap - d_an, min=0.0)
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.5, 2.0])
def test_triplet_loss_and_its_gradient_equal_the_brute_force_reference(seed, margin):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (14,), generator=generator)
    embeddings = torch.randn(14, 5, generator=generator, dtype=torch.float64).requires_grad_(True)
    ours = triplet_semihard_loss(embeddings, labels, margin)
    (ours_grad,) = torch.autograd.grad(ours, embeddings)
    reference = _reference_triplet_loss(embeddings, labels.tolist(), margin)
    (reference_grad,) = torch.autograd.grad(reference, embeddings)
    assert ours.item() > 0
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(ours_grad.double(), reference_grad, rtol=1e-4, atol=1e-5)


def test_triplet_loss_without_a_semihard_negative_uses_the_farthest_one():
    # 1-D points: the negatives of 0 and 1 all lie between them, so neither pair (0, 1) nor (1, 0)
    # has a negative farther than its positive (squared d_ap = 9): the farthest negative (4) is used.
    # For (2, 3) and (3, 2), squared d_ap = 1 and the negative at exactly 1 is not "farther": 4 is.
    embeddings = torch.tensor([[0.0], [3.0], [1.0], [2.0]])
    labels = torch.tensor([0, 0, 1, 1])
    expected = ((0.5 + 9 - 4) * 2 + 0 + 0) / 4
    assert triplet_semihard_loss(embeddings, labels, 0.5).item() == pytest.approx(expected)
    assert _reference_triplet_loss(embeddings, labels.tolist(), 0.5).item() == pytest.approx(expected)
    # With no positive pair at all the loss is 0 (not TF's 0/0).
    assert triplet_semihard_loss(embeddings, torch.arange(4), 0.5).item() == 0.0


def test_nearest_neighbour_accuracy_and_normalisation():
    embeddings = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.0, 5.2], [0.2, 0.1], [9.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    # Row 4's nearest is row 1 (label 0, wrong); row 5's nearest is row 3 (wrong): 4 of 6 right.
    assert nearest_neighbour_correct(embeddings, labels) == (4, 6)
    x = torch.randn(7, 3)
    assert torch.allclose(l2_normalize(x, dim=0).norm(dim=0), torch.ones(3))
    assert torch.allclose(l2_normalize(x, dim=1).norm(dim=1), torch.ones(7))


def _fashion_mnist(count: int) -> torch.Tensor:
    """The first ``count`` Fashion-MNIST test images as uint8 (count, 3, 32, 32), zero-padded."""
    with gzip.open(FASHION, "rb") as handle:
        data = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    images = torch.from_numpy(data.copy())[:, None].expand(-1, 3, -1, -1)
    return torch.nn.functional.pad(images, (2, 2, 2, 2))


def _colour_images(directory: Path, count: int, side: int = 40) -> torch.Tensor:
    """Colourful images written to PNG with PIL and read back: random coloured shapes."""
    rng = np.random.default_rng(0)
    loaded = []
    for index in range(count):
        image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = (int(v) for v in rng.integers(0, side - 8, 2))
            x1, y1 = x0 + int(rng.integers(4, 20)), y0 + int(rng.integers(4, 20))
            draw.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = directory / f"image_{index}.png"
        image.save(path)
        loaded.append(torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1))
    return torch.stack(loaded)


def test_copies_share_the_gray_decision_and_differ_from_each_other(tmp_path):
    task = ExemplarTask(16, ExemplarOptions(image_size=24, copies=8, gray_probability=0.5))
    images = _colour_images(tmp_path, 24)
    copies, gray = task.copies_of(images, torch.Generator().manual_seed(0))
    assert copies.shape == (24 * 8, 3, 24, 24)
    is_gray = ((copies[:, 0] - copies[:, 1]).abs().amax(dim=(1, 2)) < 1e-5) & (
        (copies[:, 1] - copies[:, 2]).abs().amax(dim=(1, 2)) < 1e-5
    )
    per_image = is_gray.view(24, 8)
    assert (per_image.all(1) | ~per_image.any(1)).all()
    assert torch.equal(per_image[:, 0], gray) and 0 < int(gray.sum()) < 24
    # Independent crops: no two copies of an image are equal.
    grouped = copies.view(24, 8, -1)
    gaps = (grouped[:, :, None] - grouped[:, None, :]).abs().amax(dim=-1)
    off_diagonal = ~torch.eye(8, dtype=torch.bool)
    assert (gaps[:, off_diagonal] > 0.1).all()
    # Every copy is standardised on its own.
    flat = copies.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(192), atol=1e-5)


def test_prepare_targets_loss_and_views_on_fashion_mnist():
    images = _fashion_mnist(6)
    task = build_task("exemplar", 20, ExemplarOptions(image_size=32, copies=4, embedding_dim=16))
    inputs, targets, _ = task.prepare(images, True, torch.Generator().manual_seed(1))
    assert inputs.shape == (24, 3, 32, 32) and torch.equal(targets, torch.arange(6).repeat_interleave(4))
    again, *_ = task.prepare(images, False, torch.Generator().manual_seed(1))
    assert torch.equal(inputs, again)  # evaluation draws the same random copies from the generator
    outputs = task(torch.randn(24, 20))
    assert outputs.shape == (24, 16)
    loss = task.loss(outputs, targets)
    # The study normalises each embedding dimension over the batch before the loss.
    assert loss.item() == pytest.approx(triplet_semihard_loss(l2_normalize(outputs, 0), targets, 0.5).item())
    right, scored = task.correct(outputs, targets)
    # The retrieval accuracy recomputed by brute force in float64: each copy's nearest other copy
    # (squared distance, embeddings normalised per dimension over the batch) is a sibling or not.
    normalised = outputs.detach().double() / outputs.detach().double().norm(dim=0, keepdim=True).clamp_min(1e-12)
    expected = 0
    for i in range(24):
        gaps = [float(((normalised[i] - normalised[j]) ** 2).sum()) if j != i else float("inf") for j in range(24)]
        expected += int(targets[gaps.index(min(gaps))] == targets[i])
    assert (right, scored) == (expected, 24)
    # Identical copies are retrieved perfectly.
    assert task.correct(outputs[targets * 4], targets) == (24, 24)
    views, count = task.eval_views(images)
    assert count == 1 and views.shape == (6, 3, 32, 32)
    assert torch.equal(views, augment.to_signed(augment.to_unit(images)))


def test_bad_options_are_refused():
    with pytest.raises(PretextlabError, match="at least 2 copies"):
        ExemplarTask(8, ExemplarOptions(copies=1))
    with pytest.raises(PretextlabError, match="batch, embedding, none"):
        ExemplarTask(8, ExemplarOptions(exemplar_normalization="l1"))


def test_shapes_and_gradients_through_a_real_network():
    from pretextlab.models import build_network

    torch.manual_seed(0)
    network = build_network("resnet50v1", width=1, patch_mode=False, input_size=32)
    task = build_task("exemplar", network.out_dim, ExemplarOptions(image_size=32, copies=4))
    images = _fashion_mnist(5)
    inputs, targets, _ = task.prepare(images, True, torch.Generator().manual_seed(2))
    assert inputs.shape == (20, 3, 32, 32)
    pre_logits = network(inputs)["pre_logits"]
    assert pre_logits.shape == (20, network.out_dim)
    outputs = task(pre_logits)
    assert outputs.shape == (20, 1000)
    loss = task.loss(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)
    views, count = task.eval_views(images)
    assert count == 1 and network.eval()(views)["pre_logits"].shape == (5, network.out_dim)


def test_the_loss_runs_per_group_of_the_released_per_core_rows():
    """Issue 16 item 5: 64 images x 8 copies = 512 rows give the mean of their eight 64-row groups'
    losses, each normalised along its own batch axis with its own negatives (float64, exact)."""
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(512, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.arange(64).repeat_interleave(8)
    task = ExemplarTask(4, ExemplarOptions())
    assert (task.options.copies, task.options.exemplar_group_images) == (8, 8)  # the released default
    whole = ExemplarTask(4, ExemplarOptions(exemplar_group_images=0))  # what runs did before the option
    loss = task.loss(outputs, targets)
    groups = [whole.loss(outputs[g * 64 : (g + 1) * 64], targets[g * 64 : (g + 1) * 64]) for g in range(8)]
    assert abs(loss.item() - sum(g.item() for g in groups) / 8) < 1e-12
    # The scope matters: the whole batch's normalisation and negatives give another loss.
    assert abs(whole.loss(outputs, targets).item() - loss.item()) > 1e-3
    (grad,) = torch.autograd.grad(loss, outputs)
    (expected,) = torch.autograd.grad(torch.stack(groups).mean(), outputs)
    assert torch.allclose(grad, expected, rtol=0, atol=1e-15)
    # Retrieval is scored among the embeddings a group's loss compares.
    right = sum(whole.correct(outputs[g * 64 : (g + 1) * 64].detach(), targets[g * 64 : (g + 1) * 64])[0] for g in range(8))
    assert task.correct(outputs.detach(), targets) == (right, 512)
    # A batch that does not divide: the last group holds the remaining images, still whole images.
    odd = ExemplarTask(4, ExemplarOptions(copies=4, exemplar_group_images=3))
    rows = [len(o) for o, _ in odd.groups(outputs[:40], torch.arange(10).repeat_interleave(4))]
    assert rows == [12, 12, 12, 4]
    with pytest.raises(PretextlabError, match="--exemplar-group-images must be >= 0"):
        ExemplarOptions(exemplar_group_images=-1).check()


def test_frozen_features_read_images_in_minus_one_to_one_or_standardised_by_option():
    """Issue 16 item 6: the released evaluation feeds [-1, 1]; "standardized" keeps the old input."""
    images = _fashion_mnist(4)
    signed, _ = ExemplarTask(4, ExemplarOptions(image_size=32)).eval_views(images)
    assert torch.equal(signed, images.float() / 255.0 * 2.0 - 1.0)
    assert signed.min().item() == -1.0 and signed.max().item() <= 1.0
    standardized, _ = ExemplarTask(4, ExemplarOptions(image_size=32, exemplar_eval_input="standardized")).eval_views(images)
    assert torch.allclose(standardized, augment.standardize(augment.to_unit(images)), atol=1e-6)
    with pytest.raises(PretextlabError, match="choose one of signed, standardized"):
        ExemplarOptions(exemplar_eval_input="raw").check()


def test_old_config_json_keeps_the_whole_batch_loss_and_standardised_features():
    from pretextlab.config import TrainConfig, config_differences, resolve, task_options

    new_keys = ("exemplar_group_images", "exemplar_eval_input")
    # A config.json written before the two options existed: today's record without their keys.
    old = {k: v for k, v in resolve(TrainConfig(task="exemplar", copies=4)).to_dict().items() if k not in new_keys}
    options = task_options(resolve(TrainConfig.from_saved(old)))
    assert (options.exemplar_group_images, options.exemplar_eval_input) == (0, "standardized")
    new = resolve(TrainConfig(task="exemplar", copies=4))
    assert (new.exemplar_group_images, new.exemplar_eval_input) == (8, "signed")
    # Resuming the old Exemplar run with today's defaults names the change; a Rotation run (which
    # reads neither option) keeps its hash and resumes with no difference.
    assert config_differences(old, new.to_dict()) == [
        "exemplar_eval_input: 'standardized' -> 'signed'", "exemplar_group_images: 0 -> 8"]
    rotation_new = resolve(TrainConfig(task="rotation", copies=4))
    rotation_old = {k: v for k, v in rotation_new.to_dict().items() if k not in new_keys}
    assert config_differences(rotation_old, rotation_new.to_dict()) == []
    assert rotation_new.config_hash() == resolve(TrainConfig.from_saved(rotation_old)).config_hash()
