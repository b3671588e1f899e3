"""The evaluate command's flags are EvalConfig's fields (issue 15: one option = one definition)."""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
from pathlib import Path

import pytest
import yaml

from pretextlab.cli import _eval_config, build_parser, main
from pretextlab.errors import PretextlabError
from pretextlab.evaluate.probe_run import EvalConfig
from pretextlab.options import add_arguments, check_fields, from_arguments, option
from pretextlab.study import expand_cells, load_study, parse_study
from pretextlab.study.model import ProbeJob
from pretextlab.study.store import ResultsStore

README = Path(__file__).resolve().parents[1] / "README.md"


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["evaluate"]


def test_every_eval_config_field_is_a_flag_with_help_and_its_default() -> None:
    from pretextlab.evaluate.backbones import BackboneSpec

    actions = {a.dest: a for a in _evaluate_parser()._actions}
    # BackboneSpec: what `evaluate --backbone` probes instead of a run (issue 17 item 4), defined the same way.
    options = [*dataclasses.fields(EvalConfig), *dataclasses.fields(BackboneSpec)]
    for f in options:
        assert f.name in actions, f"{f.name} has no evaluate flag"
        action = actions[f.name]
        assert action.default == f.default, f.name
        assert action.help and f.metadata["help"] in action.help, f.name
        # The default is said: by add_arguments for a value, in the help's own words for None.
        assert "default" in action.help, f"--{f.name}'s help does not say its default: {action.help!r}"
    # Only the run and the progress bars are flags outside EvalConfig and BackboneSpec.
    fields = {f.name for f in options}
    assert set(actions) - fields == {"help", "run", "no_progress"}


def test_choices_come_from_the_field() -> None:
    actions = {a.dest: a for a in _evaluate_parser()._actions}
    for f in dataclasses.fields(EvalConfig):
        if f.metadata["choices"]:
            assert tuple(actions[f.name].choices) == f.metadata["choices"]
    assert tuple(actions["sgd_preset"].choices) == ("paper", "precomputed")
    assert tuple(actions["probe"].choices) == ("lbfgs", "sgd", "mlp")


def _readme_evaluate_commands() -> list[list[str]]:
    commands = []
    for line in README.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("pretextlab evaluate"):
            commands.append(shlex.split(line)[1:])
    return commands


def test_the_readme_evaluate_commands_parse_to_the_configs_they_describe() -> None:
    commands = _readme_evaluate_commands()
    assert len(commands) >= 7
    parser = build_parser()
    configs = {" ".join(c): _eval_config(parser.parse_args(c)) for c in commands}
    for config in configs.values():
        assert config == dataclasses.replace(config)  # a real EvalConfig, checked
    by_line = {line.replace("evaluate --run ", ""): config for line, config in configs.items()}
    assert by_line["runs/rot"] == EvalConfig()
    assert by_line["runs/rot --output all"] == EvalConfig(outputs=("all",))
    assert by_line["runs/rot --probe sgd --sgd-schedule paper"] == EvalConfig(probe="sgd", sgd_schedule="paper")
    assert by_line["runs/rot --probe sgd --sgd-preset paper"] == EvalConfig(probe="sgd", sgd_preset="paper")
    assert by_line["runs/rot --probe mlp --output block3"] == EvalConfig(probe="mlp", outputs=("block3",))
    assert by_line["runs/rot --labels-per-class 10"] == EvalConfig(labels_per_class=10)
    assert by_line["runs/imagenet-rot --dataset folder --data-dir /data/places205"] == EvalConfig(
        dataset="folder", data_dir="/data/places205")


def test_every_flag_sets_its_field_with_the_fields_type() -> None:
    args = build_parser().parse_args(shlex.split(
        "evaluate --run r --output block1 pre_logits --probe mlp --dataset folder --data-dir d --val-size 0.1 "
        "--limit 500 --test-limit 300 --label-fraction 0.01 --batch-size 64 --device cpu --workers 2 --seed 3 "
        "--l2-grid 1 0.01 --sgd-schedule paper_long --sgd-epochs 2 --sgd-batch-size 32 --sgd-base-lr 0.5 "
        "--sgd-preset precomputed --no-progress"))
    assert _eval_config(args) == EvalConfig(
        outputs=("block1", "pre_logits"), probe="mlp", dataset="folder", data_dir="d", val_size=0.1, limit=500,
        test_limit=300, label_fraction=0.01, batch_size=64, device="cpu", workers=2, seed=3, l2_grid=(1.0, 0.01),
        sgd_schedule="paper_long", sgd_epochs=2, sgd_batch_size=32, sgd_base_lr=0.5, sgd_preset="precomputed")
    assert args.run == "r" and args.no_progress
    config = _eval_config(args)
    assert isinstance(config.outputs, tuple) and isinstance(config.l2_grid, tuple)
    assert config.l2_grid is not None and all(isinstance(v, float) for v in config.l2_grid)


@pytest.mark.parametrize("flags", [
    ["--sgd-preset", "released"],
    ["--probe", "svm"],
    ["--limit", "many"],
    ["--val-size", "a tenth"],
    ["--output"],  # at least one output
    ["--l2-grid"],  # at least one strength
])
def test_bad_evaluate_values_are_refused_before_anything_runs(flags: list[str], tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--run", str(tmp_path / "never-made"), *flags])
    assert stopped.value.code == 2
    assert "error: argument " + flags[0] in capsys.readouterr().err


def test_values_of_the_wrong_type_get_the_options_error() -> None:
    # What a caller that builds the namespace itself (not argparse) gets: the options.py check.
    with pytest.raises(PretextlabError, match=r"limit in the command line must be a whole number or null, got '5'"):
        from_arguments(EvalConfig, argparse.Namespace(limit="5"))
    with pytest.raises(PretextlabError, match="sgd_preset in x must be a string or null"):
        check_fields(EvalConfig, {"sgd_preset": True}, "x")


def test_an_option_may_name_its_flag_and_require_a_value() -> None:
    @dataclasses.dataclass
    class Toy:
        names: tuple[str, ...] = option(("a",), "names", flag="--name", nargs="+")

    parser = argparse.ArgumentParser()
    add_arguments(parser, Toy)
    assert from_arguments(Toy, parser.parse_args(["--name", "x", "y"])) == Toy(names=("x", "y"))
    assert from_arguments(Toy, parser.parse_args([])) == Toy()
    with pytest.raises(SystemExit):
        parser.parse_args(["--name"])
    assert re.search(r"names \(default: a\)", parser.format_help())


# -- a study's sgd: preset ---------------------------------------------------------------------


def _study(tmp_path: Path, sgd: dict | None, dataset: str = "fashion-mnist", probes: tuple[str, ...] = ("sgd", "mlp")):
    downstream = {"dataset": dataset, "limit": 200, "test_limit": 100}
    if dataset == "folder":
        downstream["data_dir"] = str(tmp_path / "images")
    evaluation = {"outputs": ["pre_logits"], "probes": list(probes)}
    if sgd is not None:
        evaluation["sgd"] = sgd
    data = {
        "name": "t",
        "pretext": {"dataset": "fashion-mnist", "limit": 200, "val_size": 40, "test_limit": 100, "epochs": 0.5,
                    "batch_size": 16},
        "grids": [{"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [1]}],
        "downstream": {"ds": downstream},
        "evaluations": [evaluation],
    }
    return parse_study(data, out=tmp_path / "s")


def _plan(study) -> dict[str, ProbeJob]:
    [cell] = expand_cells(study)
    return {job.probe: job for job in cell.plan}


def test_a_study_sgd_preset_is_checked_and_reaches_the_probe_job(tmp_path: Path) -> None:
    with pytest.raises(PretextlabError, match=r"unknown SGD preset 'released'.*sgd\.preset.*paper, precomputed"):
        _study(tmp_path, {"preset": "released"})
    with pytest.raises(PretextlabError, match=r"'presets'.*schedule, epochs, batch_size, base_lr, preset"):
        _study(tmp_path, {"presets": "paper"})
    study = _study(tmp_path, {"preset": "paper", "epochs": 2})
    assert study.evaluations[0].sgd.preset == "paper"
    jobs = _plan(study)
    assert jobs["sgd"].sgd.preset == "paper" and jobs["mlp"].sgd.preset == "paper"


def test_a_preset_other_than_the_datasets_default_is_a_probe_of_its_own(tmp_path: Path) -> None:
    # Fashion-MNIST's default is 'precomputed': unset and explicit keep the plain key (the same
    # recipe, so results made before the preset existed are still found done) ...
    unset, same = _plan(_study(tmp_path, None)), _plan(_study(tmp_path, {"preset": "precomputed"}))
    assert unset["sgd"].key == same["sgd"].key == ("ds", "pre_logits", "sgd", "all")
    assert unset["mlp"].key == same["mlp"].key == ("ds", "pre_logits", "mlp", "all")
    # ... while the released recipe is another result, never the precomputed one reused.
    other = _plan(_study(tmp_path, {"preset": "paper"}))
    assert other["sgd"].key == ("ds", "pre_logits", "sgd-paper", "all")
    assert other["mlp"].key == ("ds", "pre_logits", "mlp-paper", "all")
    assert other["sgd"].key != unset["sgd"].key
    # For a folder dataset (ImageNet) 'paper' is the default and 'precomputed' the other recipe.
    folder = _plan(_study(tmp_path, {"preset": "precomputed"}, dataset="folder"))
    assert folder["sgd"].key == ("ds", "pre_logits", "sgd-precomputed", "all")
    assert _plan(_study(tmp_path, {"preset": "paper"}, dataset="folder"))["sgd"].key[2] == "sgd"
    # L-BFGS has no SGD recipe: its key never changes.
    lbfgs = _plan(_study(tmp_path, {"preset": "paper"}, probes=("lbfgs",)))
    assert lbfgs["lbfgs"].key == ("ds", "pre_logits", "lbfgs", "all")


def test_a_finished_cell_whose_preset_changed_has_work_left_in_the_store(tmp_path: Path) -> None:
    before, after = _study(tmp_path, None), _study(tmp_path, {"preset": "paper"})
    [cell] = expand_cells(before)
    with ResultsStore(before.store_path) as store:
        store.register_run(cell.config_hash, task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={}, run_dir=str(cell.run_dir), plan=[j.key for j in cell.plan])
        attempt = store.claim(cell.config_hash, "me")
        for job in cell.plan:
            assert store.add_probe_result(cell.config_hash, "ds", {
                "output": job.output, "probe": job.stored_probe, "labels": "all", "val_top1_percent": 50.0,
                "test_top1_percent": 50.0, "sgd_preset": "precomputed"})
        store.end_attempt(cell.config_hash, attempt, "finished")
        assert {j.key for j in cell.plan} <= store.probe_keys(cell.config_hash)
        # The study file now asks for the released recipe: nothing it plans is done yet.
        [changed] = expand_cells(after)
        assert changed.config_hash == cell.config_hash
        store.register_run(cell.config_hash, task="rotation", network="resnet50v1", width=1, representation_size=None,
                           config={}, run_dir=str(cell.run_dir), plan=[j.key for j in changed.plan])
        assert not {j.key for j in changed.plan} & store.probe_keys(cell.config_hash)
        [run] = store.runs()
        assert run["status"] == "pending"
        # The precomputed results are kept beside the new ones, under their own key.
        assert {p["probe"] for p in store.probes()} == {"sgd", "mlp"}


def test_the_paper_grid_asks_for_the_released_sgd_recipe(tmp_path: Path) -> None:
    data = yaml.safe_load((README.parent / "configs" / "paper-imagenet.yaml").read_text())
    sgd_evaluations = [e for e in data["evaluations"] if {"sgd", "mlp"} & set(e["probes"])]
    assert sgd_evaluations and all(e["sgd"]["preset"] == "paper" for e in sgd_evaluations)
    # and the file still reads as a study, its SGD jobs keyed as before (paper is the folder default).
    study = load_study(README.parent / "configs" / "paper-imagenet.yaml", out=tmp_path / "s")
    assert all(e.sgd.preset == "paper" for e in study.evaluations if e.sgd is not None)
    rotation = next(c for c in expand_cells(study) if c.label == "rotation resnet50v2 k=4")
    assert {j.key[2] for j in rotation.plan} == {"lbfgs", "mlp", "sgd"}


@pytest.mark.slow
def test_a_study_cell_probes_with_its_preset_and_stores_it_under_its_own_key(tmp_path: Path) -> None:
    from pretextlab.study import run_study

    study = _study(tmp_path, {"preset": "paper", "epochs": 1, "batch_size": 32}, probes=("sgd",))
    data_limits = {"limit": 120, "val_size": 20, "test_limit": 100, "epochs": 0.25, "batch_size": 8}
    study = dataclasses.replace(study, pretext={**study.pretext, **data_limits},
                                runtime=dataclasses.replace(study.runtime, device="cpu"))
    outcome = run_study(study, executor="inline", progress=False, echo=lambda line: None)
    assert outcome.ok, outcome.errors
    with ResultsStore(study.store_path) as store:
        [probe] = store.probes()
    # Fashion-MNIST's default is 'precomputed': the released recipe ran, and is stored apart from it.
    assert probe["probe"] == "sgd-paper"
    assert probe["record"]["sgd_preset"] == "paper" and probe["record"]["train_split"] == "whole"
    assert probe["record"]["eval_config"]["sgd_preset"] == "paper" and "-sgd-augmented-" in probe["record"]["result_file"]
