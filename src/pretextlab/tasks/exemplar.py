"""Exemplar (Dosovitskiy et al. 2014) as the study runs it: the triplet-loss variant.

Every image of a batch of B appears as ``copies`` (8) augmented copies in one batch of 8B; copy j
of image i is row ``copies*i + j`` and its target is i. The augmentation, as the released
preprocessing ``to_gray, crop_inception_preprocess_patches, standardization``:

- gray with probability 0.66, decided once per image, so all its copies share it;
- for each copy independently: an inception crop resized to ``image_size``, a horizontal flip
  with probability 0.5 and (``exemplar_color_distortion``, on by default) slim's fast-mode colour
  distortion: brightness + U(-32/255, 32/255), then saturation x U(0.5, 1.5) (a blend with the gray
  image, torchvision's semantics; TF scales S in HSV), clipped to [0, 1];
- per-copy standardisation (TF's ``per_image_standardization``).

Head: a linear 1000-d embedding of pre_logits. Loss: TF's semi-hard triplet loss (``triplet``),
margin 0.5, copies of one image sharing a label, no cross-entropy term, on embeddings normalised as
``exemplar_normalization`` says; the study's code calls ``tf.nn.l2_normalize(logits, axis=0)``,
normalising each *dimension* over the batch ("batch", the default) rather than each embedding.

Pretext accuracy: nearest-neighbour retrieval in the batch, the fraction of copies whose nearest
other embedding (same normalisation, squared Euclidean distance) is a sibling.

``train=False`` uses the same random copies, drawn from ``generator`` (so a fixed generator gives a
fixed validation set): the study's evaluation preprocessing makes 8 identical central crops, which
would make the retrieval accuracy trivially 100%.

Loss scope (``exemplar_group_images``): the released loss runs on each TPU core's 8 images x 8
copies, so by default the batch is cut into groups of 8 images, each normalised and scored on its
own, and the groups' losses are averaged, whatever batch a device holds; 0 is one group (the whole
per-device batch, what runs before this option did).

Frozen-feature views: the central ``image_size`` crop of the decoded image (resized only if the
image is smaller), one view per image, in [-1, 1] as the released evaluation
(``exemplar_eval_input`` "signed"), or standardised per image ("standardized", what runs before
this option did).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pretextlab.data import augment
from pretextlab.errors import PretextlabError
from pretextlab.options import option
from pretextlab.data.crops import DecodePlan
from pretextlab.tasks.base import EmbeddingOptions, Prepared, PretextTask, at_least, check_decoded_size, full_precision
from pretextlab.tasks.registry import register_task
from pretextlab.tasks.triplet import l2_normalize, nearest_neighbour_correct, triplet_semihard_loss

NORMALIZATIONS = ("batch", "embedding", "none")
EVAL_INPUTS = ("signed", "standardized")
# The released global batch of 64 images (config/exemplar/imagenet.sh:24) is split by the TPU
# estimator over 8 cores (train_and_eval.py:158,244-252), and the loss (self_supervision/exemplar.py:
# 133-136) runs on each core's 8 images x 8 copies; docs/protocol.md, Exemplar.
RELEASED_GROUP_IMAGES = 8
ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


def crops_per_image(
    images: torch.Tensor, copies: int, size: int, scale: tuple[float, float], generator: torch.Generator | None
) -> torch.Tensor:
    """(B, C, H, W) -> (B*copies, C, size, size): an independent inception crop per copy.

    Same boxes and resampling as ``augment.random_resized_crop``, but every copy's box points into
    its source image, so the batch is never duplicated in memory before cropping.
    """
    batch, _, height, width = images.shape
    boxes = augment.sample_crop_boxes(
        batch * copies, height, width, scale, ASPECT_RATIO_RANGE, generator, images.device
    )
    source = torch.arange(batch, device=images.device).repeat_interleave(copies)
    rois = torch.cat([source[:, None].to(images.dtype), boxes.to(images.dtype)], dim=1)
    # Imported here, not at the top: importing torchvision loads its model zoo (~1.5 s), which
    # every `pretextlab` command would otherwise pay at start-up for the one op used from it.
    from torchvision.ops import roi_align
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


@dataclass(frozen=True)
class ExemplarOptions(EmbeddingOptions):
    """Exemplar's own options (besides the gray probability and embedding size it shares)."""

    copies: int = option(8, "exemplar copies per image")
    margin: float = option(0.5, "exemplar triplet-loss margin")
    exemplar_normalization: str = option(
        "batch", "exemplar: l2-normalise each dimension over the batch (the released code), each embedding, or none",
        choices=NORMALIZATIONS,
    )
    exemplar_color_distortion: bool = option(True, "exemplar: the released random brightness and saturation per copy")
    exemplar_group_images: int = option(
        RELEASED_GROUP_IMAGES, "exemplar: images per triplet-loss group, each group normalised and scored on its own as "
        "the released code's per-TPU-core batch (64 images over 8 cores); 0: the whole per-device batch", metavar="N",
    )
    exemplar_eval_input: str = option(
        "signed", "exemplar: frozen-feature input, signed (values in [-1, 1], the released evaluation) or standardized "
        "(per image, as in pretext training)", choices=EVAL_INPUTS,
    )

    def check(self) -> None:
        super().check()
        if self.copies < 2:
            raise PretextlabError(
                f"exemplar needs at least 2 copies per image (the triplet loss needs a positive): --copies {self.copies}"
            )
        at_least(self, "margin", 0, "the triplet-loss margin")
        at_least(self, "exemplar_group_images", 0, "images per loss group; 0 = the whole batch")


@register_task("exemplar", title="Exemplar", default_batch_size=64, options=ExemplarOptions)
class ExemplarTask(PretextTask):
    patch_mode = False

    def __init__(self, feature_dim: int, options: ExemplarOptions | None = None) -> None:
        super().__init__(feature_dim, options)
        self.embedding = nn.Linear(feature_dim, self.options.embedding_dim)

    def copies_of(
        self, images: torch.Tensor, generator: torch.Generator | None = None, cropped: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, 3, H, W) -> (standardised copies (B*copies, 3, S, S), gray decision per image (B,)).

        ``cropped``: the loader already cut the copies (``decode_plan``, issue 16): ``images`` is
        (B*copies, 3, S, S), copy j of image i at row copies*i + j, and only gray, flips and colour remain.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise PretextlabError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        options = self.options
        x = augment.to_unit(images)
        if cropped:
            check_decoded_size(images, options.image_size)
            # Gray is per pixel, so one draw shared by an image's copies equals gray before cropping.
            x, gray = augment.random_grayscale(x, options.gray_probability, generator, group=options.copies)
        else:
            x, gray = augment.random_grayscale(x, options.gray_probability, generator)
            x = crops_per_image(x, options.copies, options.image_size, tuple(options.crop_scale), generator)
        if self.options.flip:
            x = augment.random_flip(x, generator)
        if options.exemplar_color_distortion:
            x = augment.distort_color(x, generator)
        return augment.standardize(x), gray

    def prepare(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> Prepared:
        cropped = train and self.options.crop_source == "full-image"
        copies, _ = self.copies_of(images, generator, cropped=cropped)
        count = copies.shape[0] // self.options.copies
        targets = torch.arange(count, device=images.device).repeat_interleave(self.options.copies)
        return Prepared(copies, targets)

    def decode_plan(self, train: bool) -> DecodePlan | None:
        # Issue 16: the released crop_inception_preprocess_patches, ``copies`` slim inception crops
        # of the whole file per image, cut by the loader (evaluation keeps the centre square).
        if train and self.options.crop_source == "full-image":
            return DecodePlan("inception", self.options.image_size, copies=self.options.copies)
        return None

    def forward(self, pre_logits: torch.Tensor, context: Any = None) -> torch.Tensor:
        return self.embedding(pre_logits)

    def normalized(self, outputs: torch.Tensor) -> torch.Tensor:
        outputs = full_precision(outputs)
        mode = self.options.exemplar_normalization
        if mode == "batch":
            return l2_normalize(outputs, dim=0)
        if mode == "embedding":
            return l2_normalize(outputs, dim=1)
        return outputs

    def groups(self, outputs: torch.Tensor, targets: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch's loss groups: consecutive ``exemplar_group_images`` images (all their copies,
        rows being image-major), the last one smaller when the batch does not divide; one group
        holding everything with 0."""
        rows = self.options.exemplar_group_images * self.options.copies
        if rows == 0 or rows >= len(outputs):
            return [(outputs, targets)]
        return list(zip(outputs.split(rows), targets.split(rows)))

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Each group normalised along its own batch axis and given its own negatives, and the
        # groups' losses averaged, as the released per-core losses are (released code,
        # self_supervision/exemplar.py:134-136 on each core).
        losses = [triplet_semihard_loss(self.normalized(o), t, self.options.margin) for o, t in self.groups(outputs, targets)]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        # Retrieval among the embeddings the loss compares: within each group.
        counts = [nearest_neighbour_correct(self.normalized(o), t) for o, t in self.groups(outputs, targets)]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    def eval_views(self, images: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = augment.to_unit(images)
        size = self.options.image_size
        x = augment.resize(augment.center_crop(x, min(size, *x.shape[-2:])), size)
        if self.options.exemplar_eval_input == "signed":
            # The released evaluation feeds every model values in [-1, 1] (released code,
            # config/evaluation/rotation_or_exemplar.sh:31, preprocess.py:165-173), although
            # Exemplar trained on standardised copies.
            return augment.to_signed(x), 1
        return augment.standardize(x), 1
