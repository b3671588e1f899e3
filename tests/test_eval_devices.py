"""One rule for what --device means, shared by training and evaluation (issue 15)."""

from __future__ import annotations

import pytest
import torch

from pretextlab.devices import resolve_device
from pretextlab.errors import PretextlabError


def test_training_and_evaluation_use_the_same_device_rule():
    from pretextlab.evaluate import features, lbfgs, probe_run, sgd
    from pretextlab.training import resolve_device as training_rule

    assert training_rule is resolve_device
    assert features.resolve_device is lbfgs.resolve_device is sgd.resolve_device is probe_run.resolve_device is resolve_device


def test_the_device_rule():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(PretextlabError, match="--device auto, cpu"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(PretextlabError, match="CUDA is not available"):
            resolve_device("cuda:0")
