"""The trainer's jobs that live in their own modules (issue 15): SIGTERM handling and validation."""

from __future__ import annotations

import os
import signal

import pytest

from pretextlab.config import TrainConfig
from pretextlab.training import Preempted, Trainer
from pretextlab.training.preemption import stop_on_sigterm
from pretextlab.training.validation import PretextScore, pretext_score
from pretextlab.errors import PretextlabError


def test_sigterm_inside_the_context_asks_to_stop_and_the_old_handler_comes_back():
    seen: list[int] = []
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm(seen.append):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal: without the handler this process would end
    assert seen == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before
    assert issubclass(Preempted, PretextlabError)


def test_validation_scores_the_split_as_the_trainer_reports_it(tmp_path):
    config = TrainConfig(task="rotation", network="resnet50v1", width=1, image_size=32, limit=96, val_size=40,
                         test_limit=32, epochs=1, batch_size=16, device="cpu", val_batches=2)
    trainer = Trainer(config, tmp_path / "run", progress=False)
    try:
        accuracy = trainer.pretext_accuracy(trainer.splits.val)
        score = pretext_score(
            trainer.task, lambda inputs, context: trainer._forward(inputs, context, train=False), trainer.splits.val,
            trainer.config, lambda index: trainer._generator(index, purpose=1), trainer.device, trainer.dist,
        )
    finally:
        trainer.lock.release()
    # Two batches of 16 images, each scored at its four rotations; the same seeds give the same views.
    assert score == PretextScore(accuracy, trainer.val_scored, trainer.skipped_val)
    assert (score.scored, score.skipped) == (2 * 16 * 4, 0)
    with pytest.raises(AttributeError):
        score.scored = 1  # type: ignore[misc]  # a pass's result is frozen
