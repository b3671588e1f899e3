"""A study's pretext sections: every value is checked against its TrainConfig field's type."""

import pytest
import yaml

from pretextlab.cli import main
from pretextlab.errors import PretextlabError
from pretextlab.study import parse_study


def _study(pretext=None, grid_pretext=None):
    grid = {"tasks": ["rotation"], "networks": ["resnet50v1"], "widths": [1]}
    if grid_pretext is not None:
        grid["pretext"] = grid_pretext
    return {
        "name": "t",
        "pretext": {"dataset": "fashion-mnist", "limit": 200, "val_size": 40, "epochs": 0.5, "batch_size": 16, **(pretext or {})},
        "grids": [grid],
        "downstream": {"fm": {"dataset": "fashion-mnist"}},
        "evaluations": [{"outputs": ["pre_logits"], "probes": ["lbfgs"]}],
    }


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("epochs", "one", "epochs in pretext must be a number, got 'one' (str)"),
        ("flip", "false", "flip in pretext must be true or false, got 'false' (str)"),
        ("batch_size", 16.5, "batch_size in pretext must be a whole number or null, got 16.5 (float)"),
    ],
)
def test_wrong_yaml_types_name_the_key_the_value_and_the_type(tmp_path, key, value, expected):
    with pytest.raises(PretextlabError) as caught:
        parse_study(_study({key: value}), out=tmp_path)
    assert str(caught.value) == expected
    with pytest.raises(PretextlabError, match=f"^{key} in grids\\[0\\].pretext must be"):
        parse_study(_study(grid_pretext={key: value}), out=tmp_path)


def test_dry_run_of_a_study_with_a_wrong_type_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_study({"batch_size": 16.5})))
    assert main(["study", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"pretextlab: error: {path}: batch_size in pretext must be a whole number or null, got 16.5 (float)\n"


def test_right_yaml_types_are_accepted_and_canonical(tmp_path):
    study = parse_study(_study({"flip": False, "epochs": 1}), out=tmp_path)
    assert study.pretext["flip"] is False and study.pretext["epochs"] == 1.0
