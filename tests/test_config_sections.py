"""The recipe by section (issue 15): each option declares its section, --help groups the flags by
it, and config.json (run format 2) holds the options by section with the task's own options
dataclass as the task receives it, while a format-1 file still loads, resumes and keeps its hash."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from pretextlab.cli import _add_eval_arguments, _add_train_arguments
from pretextlab.config import TrainConfig, resolve, task_options
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.backbones import BackboneSpec
from pretextlab.evaluate.probe_run import EvalConfig
from pretextlab.options import SECTIONS, section_fields
from pretextlab.tasks import BUILT_IN_TASKS, task_info
from pretextlab.tasks.base import own_fields
from pretextlab.training import Trainer, load_config
from pretextlab.training.run_dir import config_record, saved_options

# config.json of a tiny Exemplar run as pretextlab wrote it at run format 1 (commit 626dc43's
# training/run_dir.config_record): every option flat under "config", and that code's hash.
V1_CONFIG = Path(__file__).parent / "data" / "run_config_v1.json"


def _help_sections(add_arguments) -> dict[str, str]:
    """The flags listed under each ``<section> options:`` heading of a command's --help."""
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    blocks = re.split(r"^(\w+) options:$", parser.format_help(), flags=re.M)
    return {name: set(re.findall(r"^  (--[\w-]+)", text, flags=re.M)) for name, text in zip(blocks[1::2], blocks[2::2])}


def test_every_option_has_a_section_and_help_lists_each_flag_under_it():
    by_section = section_fields(TrainConfig)
    assert set(by_section) == {"data", "network", "task", "optimisation", "runtime"}
    assert sum(map(len, by_section.values())) == len(dataclasses.fields(TrainConfig))  # none left out
    # A task's own options are section "task" without saying so (their one definition is the task's).
    own = {f.name for name in BUILT_IN_TASKS for f in own_fields(task_info(name).options)}
    assert set(by_section["task"]) == own | {"task"}
    shown = _help_sections(_add_train_arguments)
    assert shown == {s: {f"--{n.replace('_', '-')}" for n in names} for s, names in by_section.items()}
    evaluate = {**section_fields(EvalConfig), **{"network": section_fields(BackboneSpec)["network"]}}
    assert sum(map(len, evaluate.values())) == len(dataclasses.fields(EvalConfig)) + len(dataclasses.fields(BackboneSpec))
    assert list(_help_sections(_add_eval_arguments)) == ["data", "network", "probe", "runtime"]  # SECTIONS order
    assert set(SECTIONS) >= set(evaluate)


def test_a_format_1_run_loads_resumes_with_its_values_and_keeps_its_hash(tmp_path):
    run = tmp_path / "v1"
    run.mkdir()
    shutil.copy(V1_CONFIG, run / "config.json")
    old = json.loads(V1_CONFIG.read_text())
    config = load_config(run)
    assert config.to_dict() == TrainConfig.from_dict(old["config"]).to_dict()
    assert config.config_hash() == old["hash"] == "75ebde764e91"
    # Resume compares the old file's flat values with the new record's: one changed option is named.
    with pytest.raises(PretextlabError, match=r"its config differs from this one \(margin: 0\.3 -> 0\.4\)"):
        Trainer(dataclasses.replace(config, margin=0.4), run, resume=True, progress=False)
    Trainer(config, run, resume=True, progress=False)  # accepted; config.json rewritten at format 2
    saved = json.loads((run / "config.json").read_text())
    assert (saved["format_version"], saved["hash"], "config" in saved) == (2, old["hash"], False)
    assert load_config(run) == config and load_config(run).config_hash() == old["hash"]


def test_a_format_2_record_holds_the_sections_and_the_tasks_own_options_and_round_trips():
    config = resolve(TrainConfig(task="jigsaw", patch_size=8, margin=0.2, dataset="fashion-mnist", width=1, seed=5))
    record = json.loads(json.dumps(config_record(config, world_size=2)))
    sections = config.sections()
    options = task_options(config)  # what training/model.py gives the task
    assert sections.task.options == options and sections.task.name == "jigsaw"
    assert record["task"]["options"] == {f.name: getattr(options, f.name) for f in own_fields(type(options))}
    assert record["task"]["options"]["patch_size"] == 8 and "image_size" not in record["task"]["options"]
    # Exemplar's margin means nothing to Jigsaw, but the run's hash has always included it.
    assert record["task"]["other_tasks_options"]["margin"] == 0.2
    assert record["data"] == json.loads(json.dumps(dataclasses.asdict(sections.data)))
    assert (record["runtime"]["seed"], record["network"]["width"], record["global_batch_images"]) == (5, 1, 2 * config.batch_size)
    loaded = TrainConfig.from_saved(saved_options(record))
    assert loaded == config and loaded.config_hash() == record["hash"] == config.config_hash()
    with pytest.raises(dataclasses.FrozenInstanceError):
        sections.data.image_size = 64


@pytest.mark.parametrize("damage, message", [
    (lambda r: r["data"].update(seed=r["runtime"].pop("seed")), "seed belongs in runtime, not data"),
    (lambda r: r.pop("network"), 'expected a "network" object'),
    (lambda r: r["task"].pop("other_tasks_options"), 'expected a task object with "name", "options"'),
])
def test_a_damaged_format_2_file_is_one_clear_error_naming_it(tmp_path, damage, message):
    run = tmp_path / "run"
    run.mkdir()
    record = json.loads(json.dumps(config_record(resolve(TrainConfig(width=1)), world_size=1)))
    damage(record)
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(PretextlabError, match=rf"{re.escape(str(run / 'config.json'))} is not a pretextlab run config \(.*{message}"):
        load_config(run)
