"""The semi-hard triplet loss with exactly the semantics of TensorFlow's
``tf.contrib.losses.metric_learning.triplet_semihard_loss`` (the loss of the study's Exemplar).

Semantics (read off the TF 1.x source):

- distances are *squared* Euclidean (``pairwise_distance(embeddings, squared=True)``), computed as
  ``|a|² + |b|² - 2 a·b``, clamped at 0, with the diagonal set to exactly 0;
- every ordered pair (anchor a, positive p) with the same label and a != p counts;
- its negative is the semi-hard one: the *smallest* d(a, n) over negatives n (other label) with
  d(a, n) > d(a, p) strictly; if no negative is farther than the positive, the *largest* d(a, n)
  over all negatives of a (and 0 when a has no negative at all, TF's ``masked_maximum`` of an empty
  mask: the row minimum, the zero diagonal);
- loss = sum over those pairs of max(margin + d(a, p) - d(a, n), 0), divided by the number of pairs.

No window on the negative (d(a, n) < d(a, p) + margin is not required), no normalisation inside:
the caller normalises (the study normalises along the batch axis, see ``exemplar``). Gradients flow
through d(a, p) and the selected d(a, n), as in TF.

Instead of TF's (N², N) tiled mask this sorts each anchor's negative distances once and finds the
semi-hard one by binary search: O(N² log N) time and O(N²) memory, so large batches fit.
"""

from __future__ import annotations

import torch

from pretextlab.errors import PretextlabError
from pretextlab.tasks.base import full_precision


def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-12) -> torch.Tensor:
    """TF's ``tf.nn.l2_normalize``: x / sqrt(max(sum(x²), eps)) along ``dim``."""
    return x * torch.rsqrt(torch.clamp((x * x).sum(dim=dim, keepdim=True), min=eps))


def pairwise_squared_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, N) squared Euclidean distances, TF's way (clamped at 0, zero diagonal)."""
    squared_norms = (embeddings * embeddings).sum(dim=1)
    distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * embeddings @ embeddings.T
    distances = torch.clamp(distances, min=0.0)
    off_diagonal = ~torch.eye(len(embeddings), dtype=torch.bool, device=embeddings.device)
    return distances * off_diagonal


def triplet_semihard_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The mean semi-hard triplet hinge over all (anchor, positive) pairs; see the module docstring.

    ``embeddings`` (N, D), ``labels`` (N,) integers. A batch without any positive pair gives 0 (TF
    divides by zero and returns NaN), with the graph kept so backward still works.
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise PretextlabError(
            "triplet loss needs embeddings (N, D) and labels (N,), "
            f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        embeddings = full_precision(embeddings)
    count = len(embeddings)
    distances = pairwise_squared_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(count, dtype=torch.bool, device=embeddings.device)
    negative = ~same
    negatives_per_anchor = negative.sum(dim=1)

    # Row a: a's negative distances in increasing order, then +inf for the non-negatives.
    sorted_negatives, _ = torch.where(negative, distances, torch.full_like(distances, float("inf"))).sort(dim=1)
    # For each (a, p): the position of the first negative strictly farther than d(a, p).
    position = torch.searchsorted(sorted_negatives.detach(), distances.detach().contiguous(), right=True)
    has_semihard = position < negatives_per_anchor[:, None]
    semihard = sorted_negatives.gather(1, position.clamp(max=count - 1))
    farthest = sorted_negatives.gather(1, (negatives_per_anchor - 1).clamp(min=0)[:, None])
    farthest = torch.where(negatives_per_anchor[:, None] > 0, farthest, torch.zeros_like(farthest))
    negative_distance = torch.where(has_semihard, semihard, farthest.expand(-1, count))

    hinge = torch.clamp(margin + distances - negative_distance, min=0.0)
    pairs = positive.sum()
    if pairs == 0:
        return embeddings.sum() * 0.0
    return torch.where(positive, hinge, torch.zeros_like(hinge)).sum() / pairs


def nearest_neighbour_correct(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(how many rows have a nearest other row with the same label, number of rows)."""
    distances = pairwise_squared_distances(full_precision(embeddings))
    distances.fill_diagonal_(float("inf"))
    nearest = distances.argmin(dim=1)
    return int((labels[nearest] == labels).sum()), len(labels)
