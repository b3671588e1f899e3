"""What `pretextlab train` imports on first use, imported once in the test process.

Why: a child forked by forked_cli.py inherits only what its parent had imported. `pretextlab
train` imports more lazily (the CLI's whole parser with the evaluate modules, torchvision for the
dataset, which brings torch._dynamo, and TensorBoard's writer): ~1 CPU-s in every forked run, or
once here. A test file that forks trains imports this module before its first fork.
"""

from __future__ import annotations

import torchvision.datasets  # noqa: F401
from torch.utils.tensorboard import SummaryWriter  # noqa: F401

from pretextlab.cli import build_parser

build_parser()  # imports each subcommand's options (pretextlab.evaluate among them)
