"""The study's schedule and the config's validation."""

import pytest

from pretextlab.config import TrainConfig, config_differences, resolve
from pretextlab.errors import PretextlabError
from pretextlab.train import learning_rate


def test_paper_schedule_warmup_and_decays():
    c = resolve(TrainConfig(batch_size=64, epochs=35))
    assert c.warmup_epochs == 5 and c.decay_epochs == (15, 25)
    steps = 100  # per epoch
    peak = 0.1 * 64 / 256
    assert learning_rate(c, 0, steps) == pytest.approx(peak / 500)
    assert learning_rate(c, 249, steps) == pytest.approx(peak / 2)
    assert learning_rate(c, 499, steps) == pytest.approx(peak)
    assert learning_rate(c, 1499, steps) == pytest.approx(peak)
    assert learning_rate(c, 1500, steps) == pytest.approx(peak * 0.1)
    assert learning_rate(c, 2500, steps) == pytest.approx(peak * 0.01)
    # The learning rate scales with the global batch (multi-GPU: world size x per-device batch).
    assert learning_rate(c, 1000, steps, world_size=8) == pytest.approx(peak * 8)


def test_shortened_run_keeps_the_schedule_proportions():
    c = resolve(TrainConfig(epochs=7))
    assert c.warmup_epochs == pytest.approx(1.0)
    assert c.decay_epochs == pytest.approx((3.0, 5.0))
    explicit = resolve(TrainConfig(epochs=7, warmup_epochs=0, decay_epochs=(6,)))
    assert explicit.warmup_epochs == 0 and explicit.decay_epochs == (6,)


def test_lists_and_tuples_give_the_same_recipe():
    from_lists = resolve(TrainConfig(epochs=7, crop_scale=[0.6, 1.0], decay_epochs=[4, 6]))
    from_tuples = resolve(TrainConfig(epochs=7, crop_scale=(0.6, 1.0), decay_epochs=(4, 6)))
    assert from_lists.crop_scale == (0.6, 1.0) and from_lists.decay_epochs == (4, 6)
    assert from_lists == from_tuples and from_lists.config_hash() == from_tuples.config_hash()


def test_defaults_follow_the_study():
    assert resolve(TrainConfig(task="rotation")).batch_size == 64
    assert resolve(TrainConfig(task="jigsaw")).batch_size == 128
    folder = resolve(TrainConfig(dataset="folder"))
    assert (folder.image_size, folder.decode_size) == (224, 256)
    assert resolve(TrainConfig()).image_size == 32


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"task": "colorization"}, "unknown task 'colorization': choose one of rotation, exemplar, jigsaw, relative_patch"),
        ({"network": "alexnet"}, "unknown network 'alexnet'.*resnet50v1"),
        ({"dataset": "cifar"}, "unknown dataset 'cifar'.*fashion-mnist"),
        ({"width": 0}, "width must be an integer >= 1"),
        ({"epochs": 0}, "epochs must be > 0"),
        ({"batch_size": 1}, "batch size must be >= 2"),
        ({"epochs": 10, "decay_epochs": (12,)}, "decay epochs .* within the run's 10"),
        ({"crop_scale": (0.9, 0.5)}, "crop scale"),
        ({"precision": "fp8"}, "precision 'fp8'"),
    ],
)
def test_impossible_configs_are_refused_with_the_fix(changes, message):
    with pytest.raises(PretextlabError, match=message):
        resolve(TrainConfig(**changes))


def test_unknown_option_in_a_saved_config_is_named():
    with pytest.raises(PretextlabError, match="unknown training option.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_config_round_trip_hash_and_differences():
    c = resolve(TrainConfig(width=2, epochs=3))
    again = TrainConfig.from_dict(c.to_dict())
    assert again == c and again.config_hash() == c.config_hash()
    # Runtime-only settings do not change what a run computes.
    assert resolve(TrainConfig(width=2, epochs=3, device="cpu", workers=4)).config_hash() == c.config_hash()
    other = resolve(TrainConfig(width=2, epochs=4))
    assert other.config_hash() != c.config_hash()
    diffs = config_differences(c.to_dict(), other.to_dict())
    assert any(d.startswith("epochs: 3 -> 4") for d in diffs)
