"""Patch extraction and the shared head of the patch tasks (Jigsaw, Relative Patch Location).

Geometry (the study's released configuration, for 64-px patches): resize the image to 292x292, take
a 255x255 crop (random in training, central otherwise), cut it into a 3x3 grid of 85-px cells and
take a 64x64 crop inside each cell (random in training, central otherwise: the "patch jitter" of
85 - 64 = 21 px keeps the network from matching edges across cells). Each image turns gray with
probability 0.66 (all its patches together), and every patch is standardised on its own.

One parameter scales it all: ``patch_size`` p. With ``r(x) = floor(x + 0.5)`` (round half up):

    cell = r(85 p / 64),   crop = 3 cell,   resize = r(292 p / 64),   jitter = cell - p

which gives 85/255/292/21 at p = 64 and, e.g., 21/63/73/5 at p = 16.

Frozen-feature evaluation of a patch model follows the released evaluation config by default
(``patch_eval_geometry="released"``): resize to r(3.5 p) (224 at p = 64), central crop 3 p (192),
3x3 grid of adjacent p-px patches, no jitter, no gray; ``"pretext"`` instead uses the training
geometry above with central crops (the central p x p of each 85-px cell of the central 255 crop).

Everything runs on whole batches on the images' device: the 9 corners of every image are computed at
once and the patches are cut with one advanced-indexing gather, with no per-image Python loop.
Patches are laid out image-major in row-major grid order: patch ``k`` of image ``b`` is row
``9 b + k``, cell (row ``k // 3``, column ``k % 3``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pretextlab.data import augment
from pretextlab.data.crops import DecodePlan
from pretextlab.errors import PretextlabError
from pretextlab.options import option
from pretextlab.tasks.base import EmbeddingOptions, PretextTask, at_least, full_precision

GRID_SIDE = 3
GRID_CELLS = GRID_SIDE * GRID_SIDE
CENTRE_CELL = 4
STUDY_PATCH = 64
STUDY_CELL = 85
STUDY_RESIZE = 292
RELEASED_EVAL_RESIZE_RATIO = 3.5  # the released evaluation: resize_small 224 for 64-px patches
MIN_PATCH_SIZE = 4
PATCH_EVAL_GEOMETRIES = ("released", "pretext")
DROPOUT = 0.5  # the released ``fully_connected`` head's dropout rate (docs/protocol.md, patch tasks)
RELEASED_HEAD_BN_MOMENTUM = 1.0 - 0.997  # released code, self_supervision/patch_utils.py:195-196


@dataclass(frozen=True)
class PatchOptions(EmbeddingOptions):
    """The options Jigsaw and Relative Patch Location share (besides gray probability, embedding size).

    ``patch_size`` is the one size parameter: 64 is the study's geometry (resize 292, crop 255, cells
    of 85, patches of 64) and every other side is derived from it proportionally (``PatchGeometry``).
    ``patch_eval_geometry`` "released" (resize 3.5p, centre crop 3p, adjacent p-px patches, as the
    released evaluation) or "pretext" (the training geometry with central crops).
    """

    patch_size: int = option(64, "patch side for jigsaw/relative_patch (64 = the study)", metavar="PX")
    head_hidden: int = option(4096, "the patch tasks' FC layer width")
    patch_eval_geometry: str = option(
        "released", "how a patch-trained network is fed to probes: the released evaluation or the pretext geometry",
        choices=PATCH_EVAL_GEOMETRIES,
    )

    def check(self) -> None:
        super().check()
        at_least(self, "patch_size", MIN_PATCH_SIZE, "pixels; the study uses 64, 16 suits 32-px images")
        at_least(self, "head_hidden", 1, "units")


def round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


@dataclass(frozen=True)
class PatchGeometry:
    """Sides in pixels: the image is resized to ``resize``, cropped to ``crop`` = 3 ``cell``, and a
    ``patch`` x ``patch`` square is taken inside each cell."""

    patch: int
    cell: int
    crop: int
    resize: int

    @property
    def jitter(self) -> int:
        """How far a training patch may move inside its cell (0 ... jitter, both ends included)."""
        return self.cell - self.patch

    @classmethod
    def pretext(cls, patch_size: int) -> "PatchGeometry":
        """The study's training geometry scaled to ``patch_size`` (292/255/85/64 at 64)."""
        _check_patch_size(patch_size)
        cell = round_half_up(patch_size * STUDY_CELL / STUDY_PATCH)
        return cls(patch_size, cell, GRID_SIDE * cell, round_half_up(patch_size * STUDY_RESIZE / STUDY_PATCH))

    @classmethod
    def evaluation(cls, patch_size: int, mode: str = "released") -> "PatchGeometry":
        """The geometry of frozen-feature views (see the module docstring for the two modes)."""
        if mode not in PATCH_EVAL_GEOMETRIES:
            raise PretextlabError(
                f"unknown patch evaluation geometry {mode!r}: choose one of {', '.join(PATCH_EVAL_GEOMETRIES)}"
            )
        if mode == "pretext":
            return cls.pretext(patch_size)
        _check_patch_size(patch_size)
        crop = GRID_SIDE * patch_size
        return cls(patch_size, patch_size, crop, round_half_up(patch_size * RELEASED_EVAL_RESIZE_RATIO))


def _check_patch_size(patch_size: int) -> None:
    if not isinstance(patch_size, int) or patch_size < MIN_PATCH_SIZE:
        raise PretextlabError(
            f"patch size must be an integer >= {MIN_PATCH_SIZE}, got {patch_size!r} "
            f"(the study uses 64; 16 suits 32-px images such as Fashion-MNIST)"
        )


def cell_offsets(geometry: PatchGeometry, device: torch.device) -> torch.Tensor:
    """(9, 2) top-left (y, x) of each grid cell inside the crop, row-major."""
    steps = torch.arange(GRID_SIDE, device=device) * geometry.cell
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1)


def patch_corners(
    batch: int,
    geometry: PatchGeometry,
    train: bool,
    generator: torch.Generator | None,
    device: torch.device,
) -> torch.Tensor:
    """(B, 9, 2) top-left (y, x) of every patch in the resized image, all images at once.

    Training: a crop offset uniform in [0, resize - crop] per image and axis, and a jitter uniform in
    [0, cell - patch] per patch and axis. Otherwise both are central (floor of half the slack).
    """
    slack = geometry.resize - geometry.crop
    if train:
        crop_offset = torch.randint(0, slack + 1, (batch, 1, 2), generator=generator, device=device)
        jitter = torch.randint(0, geometry.jitter + 1, (batch, GRID_CELLS, 2), generator=generator, device=device)
    else:
        crop_offset = torch.full((batch, 1, 2), slack // 2, device=device, dtype=torch.long)
        jitter = torch.full((batch, GRID_CELLS, 2), geometry.jitter // 2, device=device, dtype=torch.long)
    return crop_offset + cell_offsets(geometry, device)[None] + jitter


def gather_patches(images: torch.Tensor, corners: torch.Tensor, size: int) -> torch.Tensor:
    """Cut a ``size`` square at every corner: (B, C, H, W), (B, P, 2) -> (B*P, C, size, size)."""
    batch, patches = corners.shape[:2]
    span = torch.arange(size, device=images.device)
    rows = (corners[..., 0, None] + span)[:, :, :, None]  # (B, P, size, 1)
    cols = (corners[..., 1, None] + span)[:, :, None, :]  # (B, P, 1, size)
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    # Advanced indices on dims 0, 2, 3 around the channel slice put the channel last: (B, P, s, s, C).
    cut = images[index, :, rows, cols]
    return cut.permute(0, 1, 4, 2, 3).reshape(batch * patches, images.shape[1], size, size)


def image_patches(
    images: torch.Tensor,
    geometry: PatchGeometry,
    train: bool,
    generator: torch.Generator | None = None,
    gray_probability: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, 3, H, W) -> (standardised patches (B*9, 3, p, p), gray decision per image (B,)).

    The gray decision is drawn per image (with ``gray_probability``) and shared by its 9 patches.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise PretextlabError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    batch = images.shape[0]
    x = augment.resize(augment.to_unit(images), geometry.resize)
    corners = patch_corners(batch, geometry, train, generator, images.device)
    patches = gather_patches(x, corners, geometry.patch)
    gray = torch.zeros(batch, dtype=torch.bool, device=images.device)
    if gray_probability > 0:
        # Gray is a per-pixel linear map, so applying it to the patches equals applying it to the image.
        patches, gray = augment.random_grayscale(patches, gray_probability, generator, group=GRID_CELLS)
    return augment.standardize(patches), gray


def arrange(features: torch.Tensor, arrangements: torch.Tensor) -> torch.Tensor:
    """(B, 9, D) per-patch features, (M, S) patch indices -> (B, M, S, D): slot s of arrangement m
    holds patch ``arrangements[m, s]`` of each image."""
    return features[:, arrangements]


class PatchClassifierHead(nn.Module):
    """The released ``fully_connected``: FC 4096 -> BN -> ReLU -> dropout -> classifier, reading the
    concatenation of ``slots`` per-patch embeddings (AlexNet's fc7-fc8)."""

    def __init__(
        self, slots: int, embedding_dim: int, hidden: int, classes: int, dropout: float, bn_init: str = "pytorch"
    ) -> None:
        super().__init__()
        self.slots, self.embedding_dim = slots, embedding_dim
        self.fc = nn.Linear(slots * embedding_dim, hidden)
        # bn_init "released": the released decay 0.997, eps 1e-5 (released code,
        # self_supervision/patch_utils.py:195-196), PyTorch momentum 1 - 0.997. "pytorch" (the
        # default before issue 16): momentum 0.1, so short runs (tests, Fashion-MNIST) do not
        # evaluate with running statistics that barely moved.
        self.bn = nn.BatchNorm1d(hidden, eps=1e-5, momentum=RELEASED_HEAD_BN_MOMENTUM if bn_init == "released" else 0.1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, classes)
        # The released initialisation: truncated normal (std 0.005), bias 0.1 on the first layer.
        nn.init.trunc_normal_(self.fc.weight, std=0.005, a=-0.01, b=0.01)
        nn.init.constant_(self.fc.bias, 0.1)
        nn.init.trunc_normal_(self.classifier.weight, std=0.005, a=-0.01, b=0.01)
        nn.init.zeros_(self.classifier.bias)

    def hidden_direct(self, embeddings: torch.Tensor, arrangements: torch.Tensor) -> torch.Tensor:
        """First layer on explicit concatenations: (B, 9, E), (M, S) -> (B*M, hidden)."""
        concatenated = arrange(embeddings, arrangements).flatten(2)  # (B, M, S*E)
        return self.fc(concatenated).flatten(0, 1)

    def hidden_by_slot(self, embeddings: torch.Tensor, arrangements: torch.Tensor) -> torch.Tensor:
        """The same as ``hidden_direct`` without materialising the M concatenations.

        The layer is linear, so W [e_p0; ...; e_pS] = sum_s W_s e_ps: project every patch through
        every slot's block of W once (9*S products per image), then let a 0/1 selection matrix sum
        the blocks each arrangement picks. Cheaper than ``hidden_direct`` (M*S products) when M > 9,
        e.g. Jigsaw's 100 (4-5x faster for the evaluation's first layer, measured on CPU).
        """
        batch, patches, _ = embeddings.shape
        hidden, slots = self.fc.out_features, self.slots
        # Rows of slot_weights are (slot, hidden unit) pairs: (S*hidden, E).
        slot_weights = self.fc.weight.view(hidden, slots, -1).transpose(0, 1).reshape(slots * hidden, -1)
        projected = (embeddings.reshape(batch * patches, -1) @ slot_weights.T).view(batch, patches * slots, hidden)
        # Row (patch p, slot s) of `projected` is p*S + s; arrangement m sums rows arr[m, s]*S + s.
        rows = arrangements * slots + torch.arange(slots, device=arrangements.device)
        selection = torch.zeros(len(arrangements), patches * slots, device=embeddings.device, dtype=projected.dtype)
        selection.scatter_(1, rows.to(embeddings.device), 1.0)
        return (torch.matmul(selection, projected) + self.fc.bias).reshape(batch * len(arrangements), hidden)

    def hidden(self, embeddings: torch.Tensor, arrangements: torch.Tensor) -> torch.Tensor:
        """The first layer's output for every (image, arrangement): (B*M, hidden), row ``b*M + m``."""
        if arrangements.shape[0] > GRID_CELLS:
            return self.hidden_by_slot(embeddings, arrangements)
        return self.hidden_direct(embeddings, arrangements)

    def forward(self, embeddings: torch.Tensor, arrangements: torch.Tensor) -> torch.Tensor:
        """(B, 9, E) embeddings, (M, S) arrangements -> (B*M, classes), row ``b*M + m``."""
        return self.classifier(self.dropout(torch.relu(self.bn(self.hidden(embeddings, arrangements)))))


class PatchTask(PretextTask):
    """Common part of Jigsaw and Relative Patch Location: patches, embedding, head, loss, views.

    ``prepare`` returns the 9 patches of every image in grid order, (B*9, 3, p, p): the network sees
    each patch once, and the head arranges the patch embeddings (as the released code does), so
    scoring all of Jigsaw's 100 permutations costs no more network passes than scoring 8.
    """

    patch_mode = True

    options_class = PatchOptions

    def __init__(self, feature_dim: int, options: PatchOptions | None, slots: int, classes: int) -> None:
        super().__init__(feature_dim, options)
        options = self.options
        self.slots, self.classes = slots, classes
        self.geometry = PatchGeometry.pretext(options.patch_size)
        self.eval_geometry = PatchGeometry.evaluation(options.patch_size, options.patch_eval_geometry)
        # The released networks end in a 1000-way "logits" layer: the per-patch embedding.
        self.embedding = nn.Linear(feature_dim, options.embedding_dim)
        self.head = PatchClassifierHead(slots, options.embedding_dim, options.head_hidden, classes, DROPOUT, options.bn_init)

    def patches(
        self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardised patches (B*9, 3, p, p), gray decision (B,)) as the pretext task sees them.

        Gray applies in evaluation too (the released ``to_gray`` step ignores the mode), drawn from
        ``generator``, so a fixed generator gives a fixed validation set.
        """
        return image_patches(images, self.geometry, train, generator, self.options.gray_probability)

    def embed(self, pre_logits: torch.Tensor) -> torch.Tensor:
        """(B*9, F) pre_logits -> (B, 9, E) per-patch embeddings."""
        if pre_logits.ndim != 2 or pre_logits.shape[0] % GRID_CELLS:
            raise PretextlabError(
                f"{self.name} expects flat pre_logits of 9 patches per image, got shape {tuple(pre_logits.shape)}"
            )
        return self.embedding(pre_logits).view(-1, GRID_CELLS, self.options.embedding_dim)

    def arrangements(self, device: torch.device, context: Any = None) -> torch.Tensor:
        """(M, slots) grid-cell indices for a batch prepared with ``context``: row m lists the
        patches whose embeddings sample m concatenates."""
        raise NotImplementedError

    def forward(self, pre_logits: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.head(self.embed(pre_logits), self.arrangements(pre_logits.device, context))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(full_precision(outputs), targets)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        return int((outputs.argmax(dim=1) == targets).sum()), int(targets.numel())

    def eval_views(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        views, _ = image_patches(images, self.eval_geometry, train=False)
        return views, GRID_CELLS

    def decode_plan(self, train: bool) -> DecodePlan | None:
        # Issue 16: the whole file resized to 292x292, aspect not kept (released code,
        # config/jigsaw/imagenet.sh:32-34), in training and for the pretext validation; the 255
        # crop and the patches are cut on the device (patch_corners).
        if self.options.crop_source == "full-image":
            return DecodePlan("squash", self.geometry.resize)
        return None
