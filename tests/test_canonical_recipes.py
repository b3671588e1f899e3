"""One recipe, one identity: a value typed as 35 (Python, YAML) or 35.0 (the CLI's float flags) names the same run and result."""

from __future__ import annotations

import json

from pretextlab.cli import build_parser
from pretextlab.config import TrainConfig
from pretextlab.evaluate.probe_run import EvalConfig


def test_integral_floats_hash_like_the_cli_parses_them() -> None:
    assert TrainConfig(epochs=35).config_hash() == TrainConfig(epochs=35.0).config_hash()
    assert TrainConfig(val_size=100).config_hash() == TrainConfig(val_size=100.0).config_hash()
    # A value that really differs still changes the identity.
    assert TrainConfig(val_size=100).config_hash() != TrainConfig(val_size=0.1).config_hash()
    assert json.dumps(EvalConfig(val_size=100).recipe()) == json.dumps(EvalConfig(val_size=100.0).recipe())


def test_the_cli_and_python_name_one_result() -> None:
    args = build_parser().parse_args(["evaluate", "--run", "r", "--val-size", "100", "--limit", "500"])
    assert isinstance(args.val_size, float)  # argparse's float: the form Python callers need not match
    assert json.dumps(EvalConfig(val_size=args.val_size, limit=500).recipe()) == json.dumps(EvalConfig(val_size=100, limit=500).recipe())
