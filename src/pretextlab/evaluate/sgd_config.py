"""The SGD-trained probes' recipe (``SgdConfig``): the released evaluation code's schedules, checked.

``paper`` is ``linear_eval.py``'s 70-epoch schedule (batch 512, x0.1 at epochs 30 and 50); ``paper_long``
the 520-epoch one behind the paper's reported SGD numbers (batch 2048, x0.1 at 480 and 500);
``scaled`` squeezes either to fewer epochs keeping its proportions.

Those two are schedules. What the probe reads is the *recipe* (``sgd_preset``): ``"paper"`` is the
released ``linear_eval`` (issue 16 item 7): features computed on the fly each epoch by the frozen
network from random 224 crops of the training images (central crops for scoring), raw, trained on
the whole training split and scored on the official test split (released code,
config/evaluation/rotation_or_exemplar.sh:26-27,31-33); ``"precomputed"`` is the fast one: cached
central-crop features, standardised, trained on train minus the held-out split. See
docs/protocol.md#probes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pretextlab.errors import PretextlabError

KINDS = ("linear", "mlp")
RESIDENCY = ("auto", "device", "stream")
FEATURES = ("precomputed", "augmented")  # cached central-crop features, or recomputed from random crops each epoch
TRAIN_SPLITS = ("train", "whole")  # train minus the held-out split, or train + held-out (the released "trainval")
PRESETS = ("paper", "precomputed")
SCHEDULES = ("paper", "paper_long")
LR_REFERENCE_BATCH = 256  # base_lr is the learning rate of a batch of this size (scaled linearly)


def _is_whole(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _tidy_epoch(value: float) -> int | float:
    """Whole epochs stay ints (30, not 30.0); fractional ones (from ``scaled``) stay floats."""
    value = float(value)
    return int(value) if value.is_integer() else round(value, 9)


@dataclass(frozen=True)
class SgdConfig:
    """How an SGD probe trains. The defaults are the study's 70-epoch linear probe (``paper("linear")``).

    ``decay_epochs`` may be fractional (a decay then happens mid-epoch, at the step it falls on) and
    may repeat a value (two decays at once). ``resident``: "auto" keeps the standardised train and
    val features on the device when they fit, "device" insists, "stream" gathers every minibatch
    from the given arrays.

    ``features`` and ``train_split`` are read by the evaluation glue (``probe_run``): "augmented"
    features need the network (``evaluate/augmented.py``), so ``sgd_probe`` on arrays refuses them;
    ``train_split`` "whole" trains on train + held-out and follows the test split instead of val.
    """

    kind: str = "linear"
    epochs: int = 70
    batch_size: int = 512
    base_lr: float = 0.1
    decay_epochs: tuple[float, ...] = (30, 50)
    decay_factor: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_epochs: float = 0
    hidden: int = 1000
    dropout: float = 0.5
    standardize: bool = True
    features: str = "precomputed"
    train_split: str = "train"
    device: str = "auto"
    resident: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PretextlabError(f"unknown probe kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        for name in ("epochs", "batch_size", "hidden"):
            value = getattr(self, name)
            if not _is_whole(value) or value < 1:
                raise PretextlabError(f"{name} must be a whole number >= 1, got {value!r}")
        if not _is_whole(self.seed):
            raise PretextlabError(f"seed must be a whole number, got {self.seed!r}")
        if not _is_number(self.base_lr) or self.base_lr <= 0:
            raise PretextlabError(f"base_lr must be a number > 0 (the study uses 0.1 per 256 images), got {self.base_lr!r}")
        try:
            decays = tuple(self.decay_epochs)
        except TypeError:
            raise PretextlabError(f"decay_epochs must be a sequence of epochs, e.g. (30, 50), got {self.decay_epochs!r}") from None
        if any(not _is_number(d) or not 0 <= d <= self.epochs for d in decays):
            raise PretextlabError(f"decay_epochs must lie between 0 and epochs={self.epochs}, got {self.decay_epochs!r}")
        if list(decays) != sorted(decays):
            raise PretextlabError(f"decay_epochs must be in increasing order, e.g. (30, 50), got {self.decay_epochs!r}")
        object.__setattr__(self, "decay_epochs", tuple(_tidy_epoch(d) for d in decays))
        if not _is_number(self.decay_factor) or not 0 < self.decay_factor <= 1:
            raise PretextlabError(f"decay_factor must be in (0, 1] (the study uses 0.1), got {self.decay_factor!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise PretextlabError(f"momentum must be in [0, 1) (the study uses 0.9), got {self.momentum!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise PretextlabError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if not _is_number(self.warmup_epochs) or not 0 <= self.warmup_epochs <= self.epochs:
            raise PretextlabError(f"warmup_epochs must lie between 0 and epochs={self.epochs}, got {self.warmup_epochs!r}")
        object.__setattr__(self, "warmup_epochs", _tidy_epoch(self.warmup_epochs))
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise PretextlabError(f"dropout must be in [0, 1) (the study's MLP uses 0.5), got {self.dropout!r}")
        if not isinstance(self.standardize, bool):
            raise PretextlabError(f"standardize must be True or False, got {self.standardize!r}")
        if self.features not in FEATURES:
            raise PretextlabError(f"unknown SGD probe features {self.features!r}: choose one of {', '.join(FEATURES)}")
        if self.features == "augmented" and self.standardize:
            raise PretextlabError(
                "augmented SGD features are recomputed every epoch, so no fixed standardisation fits them: "
                "use standardize=False with features='augmented' (the released recipe reads them raw)"
            )
        if self.train_split not in TRAIN_SPLITS:
            raise PretextlabError(f"unknown SGD train_split {self.train_split!r}: choose one of {', '.join(TRAIN_SPLITS)}")
        if self.resident not in RESIDENCY:
            raise PretextlabError(f"unknown resident mode {self.resident!r}: choose one of {', '.join(RESIDENCY)}")

    @classmethod
    def paper(cls, kind: str = "linear", **overrides: Any) -> "SgdConfig":
        """The released evaluation script's schedule: batch 512, lr 0.1 x 512/256, x0.1 at 30 and 50 of 70 epochs."""
        return cls(**{"kind": kind, "epochs": 70, "batch_size": 512, "decay_epochs": (30, 50), **overrides})

    @classmethod
    def paper_long(cls, kind: str = "linear", **overrides: Any) -> "SgdConfig":
        """The schedule behind the reported SGD numbers: batch 2048, x0.1 at 480 and 500 of 520 epochs."""
        return cls(**{"kind": kind, "epochs": 520, "batch_size": 2048, "decay_epochs": (480, 500), **overrides})

    @classmethod
    def preset(cls, name: str, kind: str = "linear", schedule: str = "paper", **overrides: Any) -> "SgdConfig":
        """A named recipe on a named schedule. ``"paper"``: the released linear_eval (on-the-fly
        random-crop features, raw, whole training split; released code, self_supervision/linear_eval.py:123-175,
        config/evaluation/rotation_or_exemplar.sh:26-33); ``"precomputed"``: cached central-crop
        features, standardised, train minus the held-out split (fast: one extraction, then only the head)."""
        if name not in PRESETS:
            raise PretextlabError(f"unknown SGD preset {name!r}: choose one of {', '.join(PRESETS)}")
        if schedule not in SCHEDULES:
            raise PretextlabError(f"unknown SGD schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        recipe: dict[str, Any] = {"features": "precomputed", "standardize": True, "train_split": "train"}
        if name == "paper":
            recipe = {"features": "augmented", "standardize": False, "train_split": "whole"}
        return getattr(cls, schedule)(kind, **{**recipe, **overrides})

    @property
    def preset_name(self) -> str | None:
        """The preset whose input recipe this is, or None for a mix of its own."""
        for name in PRESETS:
            reference = SgdConfig.preset(name)
            if all(getattr(self, f) == getattr(reference, f) for f in ("features", "standardize", "train_split")):
                return name
        return None

    def scaled(self, epochs: int) -> "SgdConfig":
        """The same schedule squeezed (or stretched) to ``epochs``: decays and warm-up keep their
        fraction of the run (70 -> 7 epochs moves the decays from 30, 50 to 3, 5)."""
        if not _is_whole(epochs) or epochs < 1:
            raise PretextlabError(f"epochs must be a whole number >= 1, got {epochs!r}")
        ratio = epochs / self.epochs
        return dataclasses.replace(
            self,
            epochs=int(epochs),
            decay_epochs=tuple(min(d * ratio, epochs) for d in self.decay_epochs),
            warmup_epochs=min(self.warmup_epochs * ratio, epochs),
        )

    def peak_lr(self, batch_size: int) -> float:
        """The learning rate after warm-up and before any decay: ``base_lr x batch_size / 256``."""
        return self.base_lr * batch_size / LR_REFERENCE_BATCH

    def learning_rate(self, step: int, steps_per_epoch: int, batch_size: int) -> float:
        """The learning rate of the update numbered ``step`` (0-based, counted over the whole run).

        Warm-up rises linearly so that its last step reaches the peak; a decay at epoch d applies
        from step ``round(d x steps_per_epoch)`` on, i.e. after d full epochs.
        """
        peak = self.peak_lr(batch_size)
        warmup_steps = round(self.warmup_epochs * steps_per_epoch)
        if step < warmup_steps:
            return peak * (step + 1) / warmup_steps
        decays = sum(step >= round(d * steps_per_epoch) for d in self.decay_epochs)
        return peak * self.decay_factor**decays

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "decay_epochs": list(self.decay_epochs)}
