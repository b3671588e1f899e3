"""Tasks register with their metadata and own their options (one definition, one check), while
TrainConfig's flat flags and old config.json files keep their meaning and their run hash."""

import dataclasses

import pytest

from pretextlab.config import TrainConfig, resolve, task_options
from pretextlab.errors import PretextlabError
from pretextlab.tasks import BUILT_IN_TASKS, TASK_REGISTRY, TaskOptions, build_task, task_info
from pretextlab.tasks.base import own_fields
from pretextlab.tasks.exemplar import ExemplarOptions, ExemplarTask
from pretextlab.tasks.jigsaw import JigsawOptions
from pretextlab.tasks.patches import PatchOptions
from pretextlab.tasks.rotation import RotationOptions

# A config.json's "config" exactly as the code before the registry wrote it (flat keys).
OLD_CONFIG = {
    "task": "exemplar", "network": "resnet50v1", "width": None, "final_relu": True, "representation_size": None,
    "dataset": "fashion-mnist", "data_dir": None, "image_size": None, "decode_size": None, "limit": 100,
    "test_limit": None, "val_size": None, "epochs": 35.0, "batch_size": None, "base_lr": 0.1, "warmup_epochs": None,
    "decay_epochs": None, "decay_factor": 0.1, "momentum": 0.9, "weight_decay": 0.0001, "crop_scale": [0.08, 1.0],
    "color_jitter": 0.4, "flip": True, "gray_probability": 0.66, "patch_size": 16, "copies": 4,
    "permutations_per_batch": 8, "num_permutations": 100, "embedding_dim": 1000, "head_hidden": 4096, "margin": 0.25,
    "permutation_criterion": "mean", "patch_eval_geometry": "released", "exemplar_normalization": "batch",
    "exemplar_color_distortion": True, "reversible_backward": None, "seed": 0, "device": "auto", "workers": None,
    "precision": "auto", "channels_last": None, "sync_bn": False, "compile": False, "val_batches": None,
    "checkpoint_every": None, "log_every": 10,
}


def test_each_task_registers_its_title_batch_size_and_options_class():
    assert BUILT_IN_TASKS == ("rotation", "exemplar", "jigsaw", "relative_patch")
    expected = {"rotation": ("Rotation", 64, RotationOptions, False), "exemplar": ("Exemplar", 64, ExemplarOptions, False),
                "jigsaw": ("Jigsaw", 128, JigsawOptions, True),
                "relative_patch": ("Relative Patch Location", 128, PatchOptions, True)}
    for name, (title, batch, options, patch_mode) in expected.items():
        info = task_info(name)
        assert (info.title, info.default_batch_size, info.options, info.patch_mode) == (title, batch, options, patch_mode)
        assert TASK_REGISTRY.get(name).name == name and TASK_REGISTRY.get(name).options_class is options
        # The study's batch size comes from the registration, nowhere else.
        assert resolve(TrainConfig(task=name, patch_size=16)).batch_size == batch


def test_every_task_option_has_one_definition_which_is_also_the_flat_flag():
    config_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    seen = {}
    for name in BUILT_IN_TASKS:
        for f in own_fields(task_info(name).options):
            assert seen.setdefault(f.name, f) is f, f"{f.name} is defined twice"
            # TrainConfig's flat field carries the task's definition itself (its help, choices), not a copy typed
            # again; its section is "task", whatever the task's dataclass says.
            assert config_fields[f.name].metadata == {**f.metadata, "section": "task"}
            assert config_fields[f.name].default == f.default
    assert set(seen) == {"color_jitter", "gray_probability", "embedding_dim", "copies", "margin", "exemplar_normalization",
                         "exemplar_color_distortion", "patch_size", "head_hidden", "patch_eval_geometry",
                         "permutations_per_batch", "num_permutations", "permutation_criterion", "permutations",
                         "exemplar_group_images", "exemplar_eval_input", "rotation_augmentation"}
    # What every task gets from the run is defined by TrainConfig, never as a task option.
    assert not {f.name for f in dataclasses.fields(TaskOptions)} & set(seen)


def test_an_old_flat_config_json_loads_with_the_same_meaning_and_the_same_hash():
    # from_saved, as load_config reads a config.json: keys added since (issue 16) take the values the run was trained with.
    config = resolve(TrainConfig.from_saved(OLD_CONFIG, "config.json"))
    # Pinned from the code before the registry: the run hash keys every stored run and study cell.
    assert config.config_hash() == "feeef90e026a"
    assert TrainConfig().config_hash() == "340afe4f571f"
    options = task_options(config)
    assert isinstance(options, ExemplarOptions)
    assert (options.copies, options.margin, options.image_size, options.crop_scale, options.embedding_dim) == (
        4, 0.25, 32, (0.08, 1.0), 1000)
    jigsaw = task_options(dataclasses.replace(config, task="jigsaw"))
    assert (type(jigsaw), jigsaw.patch_size, jigsaw.num_permutations) == (JigsawOptions, 16, 100)


def test_a_tasks_checks_live_with_its_options_and_every_path_uses_them():
    message = "exemplar needs at least 2 copies per image"
    with pytest.raises(PretextlabError, match=message):
        ExemplarOptions(copies=1).check()
    with pytest.raises(PretextlabError, match=message):
        ExemplarTask(8, {"copies": 1})
    with pytest.raises(PretextlabError, match=message):
        resolve(TrainConfig(task="exemplar", copies=1))
    with pytest.raises(PretextlabError, match="--margin must be >= 0"):
        resolve(TrainConfig(task="rotation", margin=-1.0))  # every recorded option is checked, as before
    with pytest.raises(PretextlabError, match=r"permutations per batch \(--permutations-per-batch 9\)"):
        resolve(TrainConfig(task="jigsaw", patch_size=16, num_permutations=8, permutations_per_batch=9))
    with pytest.raises(PretextlabError, match="unknown option.*copies for PatchOptions"):
        build_task("relative_patch", 4, {"copies": 4})


def test_a_task_takes_its_options_class_a_mapping_or_the_runs_shared_values():
    assert build_task("rotation", 4, TaskOptions(image_size=24)).options == RotationOptions(image_size=24)
    assert build_task("exemplar", 4, {"copies": 3}).options == ExemplarOptions(copies=3)
    assert build_task("exemplar", 4).options == ExemplarOptions()
    with pytest.raises(PretextlabError, match="copies in ExemplarOptions must be a whole number"):
        build_task("exemplar", 4, {"copies": "3"})
