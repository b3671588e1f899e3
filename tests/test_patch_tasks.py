"""Jigsaw and Relative Patch Location: patch geometry, patch identity through permutations and pairs,
the head's two equivalent paths, gray decisions, evaluation views.

Images are built so that each of the 9 grid cells has its own colour. Per-patch standardisation is a
common affine map of a patch's values, so the *direction* of each pixel's centred RGB triple
survives it and tells which cell the pixel came from, even after jitter and standardisation.
"""

import math

import numpy as np
import pytest
import torch

from pretextlab.data import augment
from pretextlab.errors import PretextlabError
from pretextlab.tasks import build_task
from pretextlab.tasks.jigsaw import JigsawTask
from pretextlab.tasks.patches import PatchClassifierHead, PatchGeometry, gather_patches, patch_corners
from pretextlab.tasks.permutations import inverse_permutations
from pretextlab.tasks.relative_patch import RelativePatchTask

PATCH = 16
GEOMETRY = PatchGeometry.pretext(PATCH)

# Cell c's colour: centred RGB triple at angle 2*pi*c/9 on the chromatic circle.
ANGLES = [2 * math.pi * c / 9 for c in range(9)]
COLOURS = torch.tensor([[128 + 100 * math.cos(a + 2 * math.pi * k / 3) for k in range(3)] for a in ANGLES])


def _options(cache_dir, **changes) -> dict:
    """Option values by name: a mapping, read by either patch task into its own options class."""
    base = dict(patch_size=PATCH, embedding_dim=9, head_hidden=81, gray_probability=0.0, cache_dir=str(cache_dir))
    base.update(changes)
    return base


def _cell_coded_images(batch: int) -> torch.Tensor:
    """uint8 images at the resize side (so no resampling) whose cells, aligned with the central
    crop, carry the 9 colours; pixels outside the crop take the nearest cell's colour."""
    side, cell, crop = GEOMETRY.resize, GEOMETRY.cell, GEOMETRY.crop
    start = (side - crop) // 2
    index = ((torch.arange(side) - start) // cell).clamp(0, 2)
    cell_of_pixel = index[:, None] * 3 + index[None, :]
    image = COLOURS[cell_of_pixel].permute(2, 0, 1).round().to(torch.uint8)
    return image.expand(batch, -1, -1, -1).contiguous()


def _decode_cells(patches: torch.Tensor) -> torch.Tensor:
    """(N, 3, p, p) standardised patches -> (N,) the cell most of each patch's pixels come from."""
    triples = patches.permute(0, 2, 3, 1)
    triples = triples - triples.mean(dim=-1, keepdim=True)
    reference = COLOURS - COLOURS.mean(dim=1, keepdim=True)
    similarity = torch.einsum("nhwc,kc->nhwk", triples, reference / reference.norm(dim=1, keepdim=True))
    votes = torch.nn.functional.one_hot(similarity.argmax(dim=-1), 9).sum(dim=(1, 2))
    return votes.argmax(dim=1)


def _decode_slots(task, patches: torch.Tensor, batch: int, context=None) -> torch.Tensor:
    """Feed one-hot cell codes through the task's own arrangement of embeddings: with an identity
    first layer, hidden unit (slot s, cell c) lights up when slot s shows cell c. -> (B*M, slots)."""
    cells = _decode_cells(patches).view(batch, 9)
    embeddings = torch.nn.functional.one_hot(cells, 9).float()
    head = task.head
    with torch.no_grad():
        head.fc.weight.copy_(torch.eye(head.fc.out_features, head.fc.in_features))
        head.fc.bias.zero_()
    hidden = head.hidden(embeddings, task.arrangements(patches.device, context))
    return hidden.view(hidden.shape[0], head.slots, 9).argmax(dim=-1)


def test_geometry_reproduces_the_study_at_64_and_scales_proportionally():
    study = PatchGeometry.pretext(64)
    assert (study.resize, study.crop, study.cell, study.patch, study.jitter) == (292, 255, 85, 64, 21)
    released_eval = PatchGeometry.evaluation(64)
    assert (released_eval.resize, released_eval.crop, released_eval.cell, released_eval.jitter) == (224, 192, 64, 0)
    assert PatchGeometry.evaluation(64, "pretext") == study
    assert (GEOMETRY.resize, GEOMETRY.crop, GEOMETRY.cell, GEOMETRY.jitter) == (73, 63, 21, 5)
    for p in range(8, 129, 4):
        g = PatchGeometry.pretext(p)
        assert abs(g.cell - 85 * p / 64) <= 0.5 and abs(g.resize - 292 * p / 64) <= 0.5
        assert g.crop == 3 * g.cell and g.resize >= g.crop and g.jitter >= 0
    assert PatchGeometry.pretext(128) == PatchGeometry(128, 170, 510, 584)
    with pytest.raises(PretextlabError, match="patch size"):
        PatchGeometry.pretext(2)
    with pytest.raises(PretextlabError, match="released, pretext"):
        PatchGeometry.evaluation(16, "middle")


def test_patch_corners_stay_in_their_cells_and_cover_the_jitter_range():
    generator = torch.Generator().manual_seed(0)
    g = PatchGeometry.pretext(64)
    corners = patch_corners(4000, g, True, generator, torch.device("cpu"))
    cell_origin = torch.tensor([[85 * (k // 3), 85 * (k % 3)] for k in range(9)])
    # Subtracting the cell origin leaves crop offset + jitter, in [0, 37] + [0, 21].
    inside = corners - cell_origin
    assert inside.min() >= 0 and inside.max() <= (292 - 255) + 21 and (corners + 64 <= 292).all()
    # The 9 patches of an image share its crop offset, so they differ only by their jitters.
    spread = inside.max(dim=1).values - inside.min(dim=1).values
    assert spread.max() <= 21 and spread.max() >= 15
    # Every offset and jitter value is drawn (uniform integer ranges, both ends included).
    assert set(inside.flatten().tolist()) == set(range(0, 37 + 21 + 1))
    central = patch_corners(2, g, False, None, torch.device("cpu"))
    assert torch.equal(central[0], cell_origin + 18 + 10)


def test_gather_patches_cuts_the_boxes():
    images = torch.rand(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    corners = torch.randint(0, 22, (3, 9, 2), generator=torch.Generator().manual_seed(2))
    cut = gather_patches(images, corners, 8).view(3, 9, 3, 8, 8)
    for b in range(3):
        for k in range(9):
            y, x = corners[b, k].tolist()
            assert torch.equal(cut[b, k], images[b, :, y : y + 8, x : x + 8])


@pytest.mark.parametrize("train", [False, True])
def test_undoing_a_jigsaw_permutation_restores_the_grid(tmp_path, train):
    task = JigsawTask(4, _options(tmp_path))
    batch = 6
    patches, targets, context = task.prepare(_cell_coded_images(batch), train, torch.Generator().manual_seed(3))
    assert patches.shape == (batch * 9, 3, PATCH, PATCH)
    # The network sees every image's patches in grid order ...
    assert torch.equal(_decode_cells(patches), torch.arange(9).repeat(batch))
    # ... and the head shows them permuted: slot k of sample (b, m) holds the cell its target's
    # permutation names, and undoing that permutation gives the grid back.
    shown = _decode_slots(task, patches, batch, context)
    samples = 8 if train else 100
    assert shown.shape == (batch * samples, 9) and targets.shape == (batch * samples,)
    perms = task.permutations.numpy()
    assert np.array_equal(shown.numpy(), perms[targets.numpy()])
    restored = np.take_along_axis(shown.numpy(), inverse_permutations(perms[targets.numpy()]), axis=1)
    assert (restored == np.arange(9)).all()


def test_jigsaw_draws_distinct_permutations_per_batch_shared_by_all_images(tmp_path):
    task = JigsawTask(4, _options(tmp_path, permutations_per_batch=8))
    images = _cell_coded_images(5)
    _, first, _ = task.prepare(images, True, torch.Generator().manual_seed(0))
    drawn = first.view(5, 8)
    assert (drawn == drawn[0]).all() and len(set(drawn[0].tolist())) == 8
    _, second, _ = task.prepare(images, True, torch.Generator().manual_seed(1))
    assert not torch.equal(first, second)
    _, again, _ = task.prepare(images, True, torch.Generator().manual_seed(0))
    assert torch.equal(first, again)
    _, every, _ = task.prepare(images, False, torch.Generator().manual_seed(0))
    assert torch.equal(every, torch.arange(100).repeat(5))


@pytest.mark.parametrize("train", [False, True])
def test_relative_patch_label_matches_the_true_offset(tmp_path, train):
    task = RelativePatchTask(4, _options(tmp_path, head_hidden=18))
    batch = 4
    patches, targets, context = task.prepare(_cell_coded_images(batch), train, torch.Generator().manual_seed(4))
    assert torch.equal(targets, torch.arange(8).repeat(batch))
    pairs = _decode_slots(task, patches, batch, context)  # (B*8, 2): (neighbour cell, centre cell)
    assert (pairs[:, 1] == 4).all()
    expected_offset = {0: (-1, -1), 1: (-1, 0), 2: (-1, 1), 3: (0, -1), 4: (0, 1), 5: (1, -1), 6: (1, 0), 7: (1, 1)}
    for (neighbour, centre), target in zip(pairs.tolist(), targets.tolist()):
        offset = (neighbour // 3 - centre // 3, neighbour % 3 - centre % 3)
        assert offset == expected_offset[target]


def test_head_computes_the_same_with_and_without_materialised_concatenations():
    torch.manual_seed(0)
    head = PatchClassifierHead(slots=9, embedding_dim=12, hidden=32, classes=100, dropout=0.5).eval()
    torch.nn.init.normal_(head.fc.weight)
    embeddings = torch.randn(5, 9, 12)
    perms = torch.stack([torch.randperm(9) for _ in range(100)])
    direct = head.hidden_direct(embeddings, perms)
    by_slot = head.hidden_by_slot(embeddings, perms)
    assert direct.shape == (500, 32)
    assert torch.allclose(direct, by_slot, atol=1e-4, rtol=1e-4)
    # Row b*M + m is image b under permutation m: check one by hand.
    b, m = 3, 41
    manual = head.fc(embeddings[b, perms[m]].reshape(-1))
    assert torch.allclose(direct[b * 100 + m], manual, atol=1e-5)


def test_gray_is_decided_per_image_and_shared_by_its_patches(tmp_path):
    task = JigsawTask(4, _options(tmp_path, gray_probability=0.5))
    images = torch.randint(0, 256, (40, 3, 50, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    patches, gray = task.patches(images, True, torch.Generator().manual_seed(6))
    channels_equal = ((patches[:, 0] == patches[:, 1]) & (patches[:, 1] == patches[:, 2])).flatten(1).all(1)
    per_image = channels_equal.view(40, 9)
    assert (per_image.all(1) | ~per_image.any(1)).all()
    assert torch.equal(per_image[:, 0], gray) and 5 < int(gray.sum()) < 35
    # Every patch is standardised on its own.
    flat = patches.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(360), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(360), atol=1e-3)


def test_eval_views_are_the_adjacent_central_grid_standardised(tmp_path):
    task = RelativePatchTask(4, _options(tmp_path, gray_probability=0.66))
    side = PatchGeometry.evaluation(PATCH).resize  # 56: the image is not resampled
    images = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(7))
    views, count = task.eval_views(images)
    assert count == 9 and views.shape == (27, 3, PATCH, PATCH)
    x = augment.to_unit(images)[:, :, 4:52, 4:52]
    tiles = [(b, 16 * (k // 3), 16 * (k % 3)) for b in range(3) for k in range(9)]
    expected = torch.stack([x[b, :, y : y + 16, x0 : x0 + 16] for b, y, x0 in tiles])
    assert torch.allclose(views, augment.standardize(expected), atol=1e-5)
    pretext_views, _ = RelativePatchTask(4, _options(tmp_path, patch_eval_geometry="pretext")).eval_views(images)
    assert pretext_views.shape == (27, 3, PATCH, PATCH) and not torch.allclose(pretext_views, views)


def test_training_patches_are_jittered_and_replayable(tmp_path):
    task = RelativePatchTask(4, _options(tmp_path))
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(8))
    a, *_ = task.prepare(images, True, torch.Generator().manual_seed(9))
    b, *_ = task.prepare(images, True, torch.Generator().manual_seed(9))
    c, *_ = task.prepare(images, True, torch.Generator().manual_seed(10))
    assert torch.equal(a, b) and not torch.equal(a, c)
    central_1, *_ = task.prepare(images, False, torch.Generator().manual_seed(9))
    central_2, *_ = task.prepare(images, False, torch.Generator().manual_seed(10))
    assert torch.equal(central_1, central_2)  # no gray here, and no jitter outside training


def test_registry_builds_both_patch_tasks(tmp_path):
    for name, cls in (("jigsaw", JigsawTask), ("relative_patch", RelativePatchTask)):
        task = build_task(name, 4, _options(tmp_path))
        assert isinstance(task, cls) and task.patch_mode and task.name == name


@pytest.mark.parametrize("name, classes", [("jigsaw", 100), ("relative_patch", 8)])
def test_shapes_and_gradients_through_a_real_patch_network(tmp_path, name, classes):
    from pretextlab.models import build_network

    torch.manual_seed(0)
    network = build_network("resnet50v1", width=1, patch_mode=True, input_size=PATCH)
    options = _options(tmp_path, embedding_dim=32, head_hidden=64, gray_probability=0.66)
    task = build_task(name, network.out_dim, options)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))
    network.train(), task.train()
    inputs, targets, context = task.prepare(images, True, torch.Generator().manual_seed(12))
    assert inputs.shape == (36, 3, PATCH, PATCH) and inputs.dtype == torch.float32
    pre_logits = network(inputs)["pre_logits"]
    assert pre_logits.shape == (36, network.out_dim)
    outputs = task(pre_logits, context)
    samples = 8
    assert outputs.shape == (4 * samples, classes) and targets.shape == (4 * samples,)
    loss = task.loss(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in network.parameters() if p.requires_grad)
    network.eval(), task.eval()
    with torch.no_grad():
        inputs, targets, context = task.prepare(images, False, torch.Generator().manual_seed(13))
        outputs = task(network(inputs)["pre_logits"], context)
        evaluated = 100 if name == "jigsaw" else 8
        assert outputs.shape == (4 * evaluated, classes) and targets.shape == (4 * evaluated,)
        right, scored = task.correct(outputs, targets)
        assert scored == 4 * evaluated and right == int((outputs.argmax(1) == targets).sum())
        # Outputs whose top class is the target on exactly the first third of the rows score a third.
        known = torch.zeros_like(outputs)
        rows = torch.arange(len(targets))
        known[rows, torch.where(rows < len(targets) // 3, targets, (targets + 1) % classes)] = 1.0
        assert task.correct(known, targets) == (len(targets) // 3, 4 * evaluated)
        views, count = task.eval_views(images)
        assert count == 9 and views.shape == (36, 3, PATCH, PATCH)
        assert network(views)["pre_logits"].shape == (36, network.out_dim)


def test_jigsaw_keeps_no_batch_state_each_batch_carries_its_permutations(tmp_path):
    """Two batches prepared before either is scored are each scored under their own permutations."""
    task = JigsawTask(8, _options(tmp_path, embedding_dim=4, head_hidden=16)).eval()
    images = _cell_coded_images(3)
    first = task.prepare(images, True, torch.Generator().manual_seed(0))
    pre_logits = torch.randn(27, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    task.double()
    with torch.no_grad():
        scored_at_once = task(pre_logits, first.context)
        state = {k: v.clone() for k, v in task.state_dict().items()}, dict(vars(task))
        second = task.prepare(images, True, torch.Generator().manual_seed(5))
        assert not torch.equal(first.context, second.context)
        assert torch.equal(task(pre_logits, first.context), scored_at_once)
        # Exactly the head on the first batch's permutations, explicitly concatenated.
        embeddings = task.embed(pre_logits)
        expected = task.head.classifier(torch.relu(task.head.bn(task.head.hidden_direct(embeddings, task.permutations[first.context]))))
        assert torch.allclose(task(pre_logits, first.context), expected, rtol=1e-12, atol=1e-12)
    assert vars(task).keys() == state[1].keys()  # prepare added nothing to the task
