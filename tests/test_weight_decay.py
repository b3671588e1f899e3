"""Issue 16 item 3: which tensors weight decay reaches (docs/protocol.md#weight-decay).

Released: --weight-decay (1e-4) on every conv kernel, the task's logits / embedding layer included;
5e-4 on the patch tasks' two-layer head; nothing on the RevNet stem, biases or BatchNorm.
``--weight-decay-scope conv-kernels`` keeps the earlier rule (4-d tensors only), which is what a
config.json written before the option means and resumes with.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pretextlab.config import TrainConfig, config_differences, resolve
from pretextlab.errors import PretextlabError
from pretextlab.training import Trainer, load_config
from pretextlab.training.model import build_model, optimizer_for, weight_decay_groups

# Kernels of each network family, counted from its architecture (not from the code under test):
# ResNet50: stem + 16 bottlenecks x 3 + 4 projections; RevNet50: 16 reversible units x 3 (+ the
# stem, which is not decayed); VGG19-BN: 16 convs + fc6 + fc7 (convolutions, as released).
RESNET50_KERNELS, REVNET50_UNIT_KERNELS, VGG19_KERNELS = 53, 48, 18
# A patch task with a small head: which group a tensor falls in does not depend on its size, and the
# released head (9 x 1000 -> 4096) spends ~3 CPU-s drawing its truncated-normal initialisation.
SMALL_PATCH_HEAD = dict(patch_size=16, embedding_dim=8, head_hidden=32)


def _built(task: str, network: str, scope: str | None = "released", **extra):
    config = resolve(TrainConfig(task=task, network=network, width=1, weight_decay_scope=scope, **extra))
    net, head = build_model(config)
    return config, net, head


def _by_factor(groups) -> dict[float, set[str]]:
    return {g.weight_decay: set(g.names) for g in groups}


def _check_partition(groups, network: nn.Module, task: nn.Module, optimizer: torch.optim.SGD) -> None:
    """Every trainable tensor is in exactly one group, and the optimizer's groups are these, in order."""
    names = [n for g in groups for n in g.names]
    expected = [f"network.{n}" for n, _ in network.named_parameters()] + [f"task.{n}" for n, _ in task.named_parameters()]
    assert sorted(names) == sorted(expected) and len(set(names)) == len(names)
    assert len(optimizer.param_groups) == len(groups)
    for group, opt_group in zip(groups, optimizer.param_groups):
        assert opt_group["weight_decay"] == group.weight_decay
        assert [id(p) for p in opt_group["params"]] == [id(p) for p in group.params]


def _network_kernels(network: nn.Module) -> set[str]:
    return {f"network.{n}.weight" for n, m in network.named_modules() if isinstance(m, nn.Conv2d)}


def test_released_scope_rotation_resnet50v1_decays_every_conv_and_the_logits_layer():
    config, network, task = _built("rotation", "resnet50v1")
    groups = weight_decay_groups(network, task, config)
    _check_partition(groups, network, task, optimizer_for(network, task, config))
    factors = _by_factor(groups)
    assert set(factors) == {1e-4, 0.0}  # no patch head
    kernels = _network_kernels(network)
    assert len(kernels) == RESNET50_KERNELS and "network.stem.conv.weight" in kernels
    # The released logits conv carries the regulariser (models/resnet.py:258-260); its bias does not.
    assert factors[1e-4] == kernels | {"task.classifier.weight"}
    assert "task.classifier.bias" in factors[0.0]
    assert all(".bn" in n or n.endswith("bias") for n in factors[0.0] if n.startswith("network."))


@pytest.mark.parametrize("task_name", ["jigsaw", "relative_patch"])
def test_released_scope_patch_tasks_on_revnet50_spare_the_stem_and_decay_the_head_at_5e_4(task_name):
    config, network, task = _built(task_name, "revnet50", **SMALL_PATCH_HEAD)
    groups = weight_decay_groups(network, task, config)
    _check_partition(groups, network, task, optimizer_for(network, task, config))
    assert [g.role for g in groups] == ["kernels", "patch-head", "none"]
    factors = _by_factor(groups)
    kernels = _network_kernels(network)
    # The stem's 7x7 conv is built with kernel_regularizer=None (released models/resnet.py:337).
    assert "network.stem.conv.weight" in kernels and len(kernels) == REVNET50_UNIT_KERNELS + 1
    assert "network.stem.conv.weight" in factors[0.0]
    # The embedding is the released network's 1000-way logits conv: --weight-decay.
    assert factors[1e-4] == (kernels - {"network.stem.conv.weight"}) | {"task.embedding.weight"}
    # fully_connected(weight_decay=5e-4) on both of its layers (released patch_utils.py:180,186,194,207).
    assert factors[5e-4] == {"task.head.fc.weight", "task.head.classifier.weight"}
    assert {"task.head.fc.bias", "task.head.classifier.bias", "task.head.bn.weight", "task.head.bn.bias",
            "task.embedding.bias"} <= factors[0.0]


def test_released_scope_exemplar_vgg19bn_decays_the_fc_convs_and_the_embedding():
    config, network, task = _built("exemplar", "vgg19bn")
    groups = weight_decay_groups(network, task, config)
    _check_partition(groups, network, task, optimizer_for(network, task, config))
    factors = _by_factor(groups)
    assert set(factors) == {1e-4, 0.0}
    kernels = _network_kernels(network)
    assert len(kernels) == VGG19_KERNELS and {"network.fc6.conv.weight", "network.fc7.conv.weight"} <= kernels
    assert factors[1e-4] == kernels | {"task.embedding.weight"}
    assert "task.embedding.bias" in factors[0.0]


def test_released_scope_follows_the_flag_and_decays_the_representation_layer():
    config, network, task = _built("rotation", "resnet50v2", weight_decay=3e-4, representation_size=8)
    factors = _by_factor(weight_decay_groups(network, task, config))
    assert set(factors) == {3e-4, 0.0}
    assert {"network.representation.weight", "task.classifier.weight"} <= factors[3e-4]


def test_the_optimizer_applies_each_factor_to_its_tensors():
    """One SGD step on zero gradients, float64: a tensor moves by exactly lr * factor * itself."""
    config, network, task = _built("relative_patch", "revnet50", **SMALL_PATCH_HEAD)
    network.double(), task.double()
    optimizer = optimizer_for(network, task, config)
    for group in optimizer.param_groups:
        group["lr"] = 10.0
    named = {f"network.{n}": p for n, p in network.named_parameters()} | {f"task.{n}": p for n, p in task.named_parameters()}
    before = {n: p.detach().clone() for n, p in named.items()}
    for p in named.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, factor in [("task.head.fc.weight", 5e-4), ("task.head.classifier.weight", 5e-4),
                         ("task.embedding.weight", 1e-4), ("network.stem.conv.weight", 0.0),
                         ("task.head.fc.bias", 0.0), ("task.head.bn.weight", 0.0)]:
        torch.testing.assert_close(named[name].detach(), before[name] * (1 - 10.0 * factor), rtol=1e-14, atol=0)
        assert factor == 0.0 or not torch.equal(named[name], before[name]), name


def test_conv_kernels_scope_is_the_earlier_rule_in_its_two_group_layout():
    config, network, task = _built("relative_patch", "revnet50", scope="conv-kernels", **SMALL_PATCH_HEAD)
    groups = weight_decay_groups(network, task, config)
    _check_partition(groups, network, task, optimizer_for(network, task, config))
    # The earlier optimizer: [4-d tensors at --weight-decay, the rest at 0], in parameter order.
    params = list(network.parameters()) + list(task.parameters())
    assert [g.weight_decay for g in groups] == [1e-4, 0.0]
    assert [id(p) for p in groups[0].params] == [id(p) for p in params if p.ndim == 4]
    assert [id(p) for p in groups[1].params] == [id(p) for p in params if p.ndim != 4]
    assert "network.stem.conv.weight" in groups[0].names and "task.head.fc.weight" in groups[1].names
    # Both groups exist even when the factor is 0, so the optimizer state of such a run loads too.
    zero = resolve(TrainConfig(task="rotation", width=1, weight_decay=0.0, weight_decay_scope="conv-kernels"))
    assert [g.weight_decay for g in weight_decay_groups(*build_model(zero), zero)] == [0.0, 0.0]


def test_defaults_old_configs_and_bad_values():
    assert resolve(TrainConfig(dataset="folder", data_dir="/tmp")).weight_decay_scope == "released"
    fashion = resolve(TrainConfig())
    assert fashion.weight_decay_scope == "conv-kernels"
    # A config.json written before the option (no key) means the earlier rule, for folder runs too,
    # keeps its hash and shows no difference against the same run asked for today.
    for dataset in ("fashion-mnist", "folder"):
        new = resolve(TrainConfig(dataset=dataset, data_dir="/tmp", weight_decay_scope="conv-kernels"))
        old = {k: v for k, v in json.loads(json.dumps(new.to_dict())).items() if k != "weight_decay_scope"}
        loaded = resolve(TrainConfig.from_saved(old))
        assert loaded.weight_decay_scope == "conv-kernels" and loaded.config_hash() == new.config_hash()
        assert config_differences(old, new.to_dict()) == []
    released = resolve(TrainConfig(weight_decay_scope="released"))
    assert released.config_hash() != fashion.config_hash()
    assert config_differences(fashion.to_dict(), released.to_dict()) == ["weight_decay_scope: 'conv-kernels' -> 'released'"]
    with pytest.raises(PretextlabError, match="weight_decay_scope 'heads': choose one of released, conv-kernels"):
        resolve(TrainConfig(weight_decay_scope="heads"))


def test_the_flag_parses_and_a_wrong_value_is_one_clear_error(capsys):
    from pretextlab.cli import _train_config, build_parser, main

    args = build_parser().parse_args(["train", "--out", "x", "--weight-decay-scope", "released"])
    assert resolve(_train_config(args)).weight_decay_scope == "released"
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--weight-decay-scope", "heads"])
    assert "--weight-decay-scope" in capsys.readouterr().err


def _tiny(**changes) -> TrainConfig:
    # 2 steps an epoch; 16-pixel images and no kNN monitor (which changes no weight) keep fp64 cheap.
    base = dict(
        task="rotation", network="resnet50v1", width=1, image_size=16, limit=64, val_size=32, test_limit=32,
        epochs=2, batch_size=16, crop_scale=(0.6, 1.0), color_jitter=0.0, device="cpu", val_batches=1,
        precision="fp64", base_lr=0.4, monitor_every=0,
    )
    base.update(changes)
    return TrainConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    return {f"{part}.{k}": v for part in ("network", "task") for k, v in saved[part].items()}


@pytest.mark.slow
def test_an_old_run_without_the_key_resumes_exactly_as_it_was_trained(tmp_path):
    """A run whose config.json predates the option, stopped after epoch 1, resumes with the earlier
    rule and ends with the uninterrupted run's weights bit for bit (float64, one thread); the
    released scope would have ended elsewhere, so the equality is not vacuous."""
    whole = tmp_path / "whole"
    Trainer(_tiny(weight_decay_scope="conv-kernels"), whole, progress=False).fit()
    old = tmp_path / "old"
    old.mkdir()
    for path in whole.iterdir():
        if path.is_file():
            (old / path.name).write_bytes(path.read_bytes())
    # The state after epoch 1, with the config.json an earlier pretextlab wrote (no key).
    saved = json.loads((whole / "config.json").read_text())
    flat = {k: v for k, v in load_config(whole).to_dict().items() if k != "weight_decay_scope"}
    (old / "config.json").write_text(json.dumps({"format_version": 1, "config": flat, "hash": saved["hash"]}))
    (old / "checkpoint.pt").write_bytes((whole / "checkpoint.prev.pt").read_bytes())
    for name in ("checkpoint.json", "checkpoint.prev.pt", "checkpoint.prev.json", "summary.json"):
        (old / name).unlink(missing_ok=True)
    assert load_config(old).weight_decay_scope == "conv-kernels"
    resumed = Trainer(_tiny(), old, resume=True, progress=False)
    assert resumed.step == 2
    resumed.fit()
    a, b = _weights(whole), _weights(old)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = tmp_path / "released"
    Trainer(_tiny(weight_decay_scope="released"), other, progress=False).fit()
    assert not torch.equal(_weights(other)["task.classifier.weight"], a["task.classifier.weight"])
