"""Jigsaw puzzles (Noroozi & Favaro 2016) as the study runs them.

Every image is cut into its 3x3 grid of patches (see ``patches``); each patch goes through the
shared network to pre_logits and a linear layer to a 1000-d embedding; for a permutation p the 9
embeddings are concatenated in permuted order (slot k holds patch p[k]) -> FC 4096 -> BN -> ReLU ->
dropout 0.5 -> a classifier over the permutation set (100 maximal-Hamming-distance permutations,
``permutations``), or the published set read from ``--permutations FILE`` (the released binary
format). The target is the index of the permutation in the set.

Which permutations a batch is scored on (the released code's "method 2"): in training,
``permutations_per_batch`` (8) distinct indices are drawn without replacement once per batch and
every image of the batch is shown under all of them, so a batch of B images gives 8B samples. The
alternative, independent permutations per image, would change nothing in expectation and needs a
gather per image; the released code chose the shared draw "for simplicity" and so do we, so a
batch's samples match theirs. In evaluation (``train=False``) every image is scored under all 100.

Outputs and targets are image-major: row ``b*M + m`` is image b under the batch's m-th permutation.
``prepare`` returns the batch's permutation indices as its context and ``forward`` applies them;
``forward`` without a context scores all permutations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pretextlab.errors import PretextlabError
from pretextlab.options import option
from pretextlab.tasks.base import Prepared, at_least, options_of
from pretextlab.tasks.patches import GRID_CELLS, PatchOptions, PatchTask
from pretextlab.tasks.permutations import minimum_hamming_distance, permutation_set, read_permutation_file
from pretextlab.tasks.registry import register_task


@dataclass(frozen=True)
class JigsawOptions(PatchOptions):
    """Jigsaw's own options (besides the patch tasks' shared ones).

    ``permutation_criterion``: "mean" (Noroozi & Favaro's Algorithm 1, the released set) or "min"
    (max-min Hamming distance), where the released code and the obvious reading differ.
    """

    permutations_per_batch: int = option(8, "jigsaw permutations drawn per batch, every image shown under each")
    num_permutations: int = option(100, "size of the jigsaw permutation set")
    permutation_criterion: str = option(
        "mean", "jigsaw set: mean (Noroozi & Favaro, the released set) or min (max-min) Hamming distance", choices=("mean", "min")
    )
    permutations: str | None = option(
        None, "jigsaw: read the permutation set from FILE in the released binary format (the study's "
        "permutations_100_max.bin) instead of generating it; its count must equal --num-permutations", metavar="FILE",
    )

    def check(self) -> None:
        super().check()
        at_least(self, "num_permutations", 1, "permutations")
        if not 1 <= self.permutations_per_batch <= self.num_permutations:
            raise PretextlabError(
                f"permutations per batch (--permutations-per-batch {self.permutations_per_batch}) must be between 1 "
                f"and the number of permutations (--num-permutations {self.num_permutations})"
            )
        if self.permutations is not None:
            self.permutation_file()  # a wrong file is refused when the run is configured, not mid-training

    def permutation_file(self) -> np.ndarray:
        """The permutations of the ``--permutations`` file, checked against ``--num-permutations``."""
        rows = read_permutation_file(self.permutations)
        if len(rows) != self.num_permutations:
            raise PretextlabError(
                f"--permutations {self.permutations} holds {len(rows)} permutations but --num-permutations is "
                f"{self.num_permutations}: set --num-permutations {len(rows)} (the classifier has one class per permutation)"
            )
        return rows


@register_task("jigsaw", title="Jigsaw", default_batch_size=128, options=JigsawOptions)
class JigsawTask(PatchTask):
    def __init__(self, feature_dim: int, options: JigsawOptions | None = None) -> None:
        options = options_of(JigsawOptions, options)  # the classifier's size is read before the base checks it
        super().__init__(feature_dim, options, slots=GRID_CELLS, classes=options.num_permutations)
        options, count = self.options, options.num_permutations
        if options.permutations is not None:
            # The published set, as the released code loads it (self_supervision/patch_utils.py:218-234).
            rows = options.permutation_file()
        else:
            rows = permutation_set(count, options.seed, options.permutation_criterion, options.cache_dir).permutations
        self.min_hamming_distance = minimum_hamming_distance(rows)
        # Saved with the weights: a checkpoint keeps the exact set its classifier was trained on.
        self.register_buffer("permutations", torch.as_tensor(rows, dtype=torch.long))

    def draw_permutations(self, train: bool, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """The indices a batch is scored on: ``permutations_per_batch`` distinct ones in training, all otherwise."""
        count = self.options.num_permutations
        if not train:
            return torch.arange(count, device=device)
        return torch.randperm(count, generator=generator, device=device)[: self.options.permutations_per_batch]

    def prepare(self, images: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> Prepared:
        patches, _ = self.patches(images, train, generator)
        chosen = self.draw_permutations(train, generator, images.device)
        return Prepared(patches, chosen.repeat(images.shape[0]), chosen)

    def arrangements(self, device: torch.device, context: Any = None) -> torch.Tensor:
        """The permutations a batch was prepared with (its context; all of them without one), in target order."""
        if context is None:
            return self.permutations.to(device)
        return self.permutations[context.to(self.permutations.device)].to(device)
