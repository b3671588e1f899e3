"""One rank of two jobs under one torchrun launch (gloo), so the tests pay the ranks' start-up once:

1. the `pretextlab` command line (cli.main, exactly as `python -m pretextlab` runs it) with the
   arguments after argv[3] (`-- evaluate --run ...`): it joins the process group itself, as the
   real command does, and rank 0 alone prints its one JSON document on stdout;
2. then, on the group the command left initialised, the sharded float64 L-BFGS probe on the
   features in argv[1], saving its result, classifier and held feature bytes to argv[2]/rank{RANK}.pt.

This script prints nothing itself: stdout is the command's alone.

Usage: lbfgs_shard.py FEATURES_DIR OUT_DIR SETTINGS_JSON [-- CLI ARGS...]"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretextlab.cli import main
from pretextlab.evaluate.common import ProbeData
from pretextlab.evaluate.distributed_probe import sharded_lbfgs_fit
from pretextlab.evaluate.lbfgs import LbfgsConfig

features, out, settings, command = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
if command[:1] == ["--"]:  # torchrun passes a script's "--" on (the one that keeps it off --run)
    command = command[1:]
torch.set_num_threads(1)
if command:
    code = main(command)
    if code:
        raise SystemExit(code)
    assert dist.is_initialized() and dist.get_world_size() == 2, "the command should have joined torchrun's group"
else:
    dist.init_process_group("gloo")
splits = [(np.load(features / f"{s}_x.npy", mmap_mode="r"), np.load(features / f"{s}_y.npy")) for s in ("train", "val", "test")]
result, weight, bias = sharded_lbfgs_fit(ProbeData(*splits, num_classes=10), LbfgsConfig(**settings), progress=False, dtype=torch.float64)
torch.save({"result": result.to_dict(), "weight": weight, "bias": bias}, out / f"rank{dist.get_rank()}.pt")
dist.destroy_process_group()
