"""One rank of the sharded L-BFGS probe under torchrun (gloo): fits the features in argv[1] and
saves its result, classifier and held feature bytes to argv[2]/rank{RANK}.pt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.distributed_probe import sharded_lbfgs_fit
from pretextlab.evaluate.lbfgs import LbfgsConfig

features, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(1)
dist.init_process_group("gloo")
splits = [(np.load(features / f"{s}_x.npy", mmap_mode="r"), np.load(features / f"{s}_y.npy")) for s in ("train", "val", "test")]
config = LbfgsConfig(**json.loads(sys.argv[3]))
result, weight, bias = sharded_lbfgs_fit(ProbeData(*splits, num_classes=10), config, progress=False, dtype=torch.float64)
torch.save({"result": result.to_dict(), "weight": weight, "bias": bias}, out / f"rank{dist.get_rank()}.pt")
dist.destroy_process_group()
