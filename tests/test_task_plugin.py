"""A fifth task from outside the package (tests/toy_task.py) trains through the CLI as
``--task module:Class``; the spec is recorded, so the run's network and head load again from it."""

import json

import pytest

from pretextlab.cli import main
from pretextlab.config import TrainConfig, resolve
from pretextlab.errors import PretextlabError
from pretextlab.training import load_trained, read_metrics

SPEC = "toy_task:UpsideDownTask"  # tests/ is on sys.path under pytest (rootdir conftest, prepend mode)


def test_a_toy_task_registered_outside_the_package_trains_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--task", SPEC, "--network", "resnet50v1", "--width", "1", "--limit", "64",
                 "--val-size", "16", "--epochs", "1", "--device", "cpu", "--val-batches", "1", "--log-every", "1",
                 "--batch-size", "16", "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)  # stdout is the summary alone
    task = json.loads((out / "config.json").read_text())["task"]
    # The spec, and the plug-in's own options as the task received them (no flags: their defaults).
    assert task["name"] == SPEC and task["options"] == {"label_smoothing": 0.0}
    # 64 images less 16 held out = 48 training images, 3 steps of 16, each logged (--log-every 1).
    assert (summary["status"], summary["steps"]) == ("finished", 3)
    logged = [m for m in read_metrics(out) if "loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3]
    assert all(0 < m["loss"] < 10 for m in logged)  # a finite 2-way cross-entropy (ln 2 at chance)
    loaded, network, task = load_trained(out)
    assert (loaded.task, type(task).__name__, task.name) == (SPEC, "UpsideDownTask", "upside_down")
    assert task.options.image_size == 32 and task.options.label_smoothing == 0.0


def test_the_plug_ins_registration_gives_its_batch_size_and_a_bad_spec_one_clear_error():
    assert resolve(TrainConfig(task=SPEC)).batch_size == 32
    with pytest.raises(PretextlabError, match="cannot import module 'no_such_module'.*PYTHONPATH"):
        resolve(TrainConfig(task="no_such_module:Task"))
    with pytest.raises(PretextlabError, match="toy_task has no registered task class 'Nope'.*register_task"):
        resolve(TrainConfig(task="toy_task:Nope"))
    with pytest.raises(PretextlabError, match="unknown task 'toy': choose one of rotation, .*relative_patch"):
        resolve(TrainConfig(task="toy"))
