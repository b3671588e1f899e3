"""Each rank's main program in tests/test_distributed.py (forked ranks with torchrun's environment,
tests/forked_ranks.py): `pretextlab train` through its command line (cli.main, as `python -m
pretextlab` runs it), and each rank then dumps its own network weights (the checkpoint holds rank 0's only).

Usage: ddp_cli.py DUMP_DIR train --task ... (the command's arguments)."""

import sys
from pathlib import Path

import torch

from pretextlab.cli import main
from pretextlab.training import Trainer

dump_dir = Path(sys.argv[1])
fit = Trainer.fit


def fit_and_dump(self: Trainer) -> dict:
    summary = fit(self)
    torch.save(self.network.state_dict(), dump_dir / f"rank{self.rank}.pt")
    return summary


Trainer.fit = fit_and_dump
raise SystemExit(main(sys.argv[2:]))
