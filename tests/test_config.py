"""The study's schedule and the config's validation."""

import re

import pytest

from pretextlab.config import TrainConfig, config_differences, resolve
from pretextlab.errors import PretextlabError
from pretextlab.training import learning_rate


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
    assert any(d.startswith("epochs: 3.0 -> 4.0") for d in diffs)  # one form per value: 3 and 3.0 hash alike


# -- issue 14: dataset identity in the hash, value types, impossible values ----------------------


def _image_folder(root, classes=("a", "b"), per_class=4, size=20, shade=0):
    """A real ImageNet-layout folder (ROOT/train/<class>/*.png, ROOT/val/<class>/*.png) made with PIL."""
    from PIL import Image

    for split, count in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(count):
                value = (40 * c + 7 * i + shade) % 256
                Image.new("RGB", (size, size), (value, 255 - value, (3 * value) % 256)).save(directory / f"{i}.png")
    return root


def test_two_image_folders_are_two_recipes_and_two_spellings_of_one_are_one(tmp_path, monkeypatch):
    first = resolve(TrainConfig(dataset="folder", data_dir=str(tmp_path / "one")))
    second = resolve(TrainConfig(dataset="folder", data_dir=str(tmp_path / "two")))
    assert first.config_hash() != second.config_hash()
    assert any(d.startswith("data_dir:") for d in config_differences(first.to_dict(), second.to_dict()))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link").symlink_to(tmp_path / "one")
    for spelling in ("one", "./one/", "link", str(tmp_path / "one")):
        again = resolve(TrainConfig(dataset="folder", data_dir=spelling))
        assert again.data_dir == str(tmp_path / "one") and again.config_hash() == first.config_hash()


def test_resume_into_a_run_on_another_image_folder_is_refused_without_force(tmp_path, capsys):
    from pretextlab.cli import main

    one, two = _image_folder(tmp_path / "one"), _image_folder(tmp_path / "two", shade=100)
    common = ["train", "--task", "rotation", "--network", "resnet50v1", "--width", "1", "--dataset", "folder",
              "--image-size", "16", "--batch-size", "4", "--val-size", "2", "--epochs", "1", "--device", "cpu",
              "--workers", "0", "--no-progress", "--out", str(tmp_path / "run")]
    assert main([*common, "--data-dir", str(one)]) == 0
    capsys.readouterr()
    assert main([*common, "--data-dir", str(two), "--resume"]) == 2
    error = capsys.readouterr().err
    assert "config differs" in error and "data_dir" in error and str(two) in error, error


def test_hash_holds_only_fields_and_a_legacy_extra_key_still_loads():
    c = resolve(TrainConfig(width=2, epochs=3))
    assert "extra" not in c.to_dict()
    legacy = {**c.to_dict(), "extra": {}}  # config.json written before `extra` was dropped
    assert TrainConfig.from_dict(legacy) == c
    assert config_differences(legacy, c.to_dict()) == []


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("epochs", "one", "a number"),
        ("flip", "false", "true or false"),
        ("batch_size", 16.5, "a whole number or null"),
        ("width", True, "a whole number or null"),
        ("crop_scale", [0.5], r"a list of 2 \(a number, a number\)"),
        ("decay_epochs", "10", "a list of numbers or null"),
        ("task", 3, "a string"),
    ],
)
def test_a_wrong_type_is_named_with_its_key_value_and_expected_type(key, value, expected):
    with pytest.raises(PretextlabError, match=rf"^{key} in config.json must be {expected}, got {re.escape(repr(value))}"):
        TrainConfig.from_dict({key: value}, where="config.json")
    # Python callers get the same check.
    with pytest.raises(PretextlabError, match=rf"^{key} must be {expected}"):
        resolve(TrainConfig(**{key: value}))


def test_a_wrong_shaped_saved_config_is_a_clear_error():
    with pytest.raises(PretextlabError, match="must be a mapping of option: value, got list"):
        TrainConfig.from_dict([1, 2], where="runs/x/config.json")


def test_right_values_are_canonicalised():
    c = TrainConfig.from_dict({"epochs": 7, "crop_scale": [1, 1], "decay_epochs": [4, 6], "flip": False})
    assert c.epochs == 7.0 and isinstance(c.epochs, float)
    assert c.crop_scale == (1.0, 1.0) and c.decay_epochs == (4.0, 6.0) and c.flip is False


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"epochs": -1}, "epochs must be > 0"),
        ({"epochs": float("nan")}, "epochs must be > 0"),
        ({"batch_size": 0}, "batch size must be >= 2"),
        ({"crop_scale": (0.6, 0.5)}, r"crop scale \(0.6, 0.5\) must satisfy 0 < min <= max <= 1"),
        ({"warmup_epochs": float("nan")}, "--warmup-epochs must be a finite number"),
        ({"momentum": 1.0}, "--momentum must be < 1"),
        ({"gray_probability": 1.5}, "--gray-probability must be <= 1"),
        ({"weight_decay": -1e-4}, "--weight-decay must be >= 0"),
        ({"log_every": 0}, "--log-every must be >= 1"),
        ({"checkpoint_every": 0}, "--checkpoint-every must be >= 1"),
        ({"seed": -3}, "--seed must be >= 0"),
        ({"val_size": 0.0}, "--val-size must be > 0"),
        ({"embedding_dim": 0}, "--embedding-dim must be >= 1"),
        ({"patch_size": 2}, "--patch-size must be >= 4"),  # the patch tasks' own bound (tasks/patches.py)
    ],
)
def test_values_of_the_right_type_that_cannot_mean_anything_are_refused(changes, message):
    with pytest.raises(PretextlabError, match=message):
        resolve(TrainConfig(**changes))


# -- issue 15: one option, one definition: the train flags are generated from TrainConfig ---------


def _parse_train(*flags):
    from pretextlab.cli import _train_config, build_parser

    return _train_config(build_parser().parse_args(["train", "--out", "x", *flags]))


def test_every_option_is_a_flag_with_help_and_its_default_shown():
    import dataclasses

    from pretextlab.cli import build_parser

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    actions = {a.dest: a for a in train._actions}
    for f in dataclasses.fields(TrainConfig):
        action = actions[f.name]
        assert action.help.startswith(f.metadata["help"]), f.name
        if f.default is not None:
            assert "(default: " in action.help, f.name
    assert _parse_train() == TrainConfig()  # the command line's defaults are the config's


def test_the_flags_people_type_keep_working():
    c = _parse_train("--no-final-relu", "--no-flip", "--no-exemplar-color-distortion", "--reversible-backward",
                     "--sync-bn", "--compile", "--crop-scale", "0.5", "1", "--decay-epochs", "--epochs", "3",
                     "--batch-size", "16", "--width", "2", "--permutation-criterion", "min", "--data-dir", "/d")
    assert (c.final_relu, c.flip, c.exemplar_color_distortion, c.reversible_backward, c.sync_bn, c.compile) == (
        False, False, False, True, True, True)
    assert c.crop_scale == (0.5, 1.0) and c.decay_epochs == () and c.epochs == 3.0 and c.batch_size == 16
    assert (c.width, c.permutation_criterion, c.data_dir) == (2, "min", "/d")
    assert _parse_train("--no-reversible-backward").reversible_backward is False
    assert _parse_train("--decay-epochs", "1", "2").decay_epochs == (1.0, 2.0)


def test_a_choice_outside_the_metadata_is_refused_by_the_parser_and_by_resolve(capsys):
    with pytest.raises(SystemExit):
        _parse_train("--precision", "fp8")
    assert "invalid choice: 'fp8'" in capsys.readouterr().err
    with pytest.raises(PretextlabError, match="exemplar_normalization 'l1': choose one of batch, embedding, none"):
        resolve(TrainConfig(exemplar_normalization="l1"))
