"""Each rank's main program (under torchrun in tests/test_slurm.py, forked in tests/test_distributed.py):
train one tiny run, then each rank dumps its own network weights."""

import json
import sys
from pathlib import Path

import torch

from pretextlab.config import TrainConfig
from pretextlab.training import Trainer

config = TrainConfig.from_dict(json.loads(sys.argv[1]))
run_dir, dump_dir = Path(sys.argv[2]), Path(sys.argv[3])
trainer = Trainer(config, run_dir, resume=True, progress=False)
trainer.fit()
torch.save(trainer.network.state_dict(), dump_dir / f"rank{trainer.rank}.pt")
