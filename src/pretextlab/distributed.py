"""Moved to pretextlab.training.distributed; this name stays for scripts written against it."""

from pretextlab.training.distributed import *  # noqa: F401,F403
from pretextlab.training.distributed import CrossRankBatchNorm, DistributedContext  # noqa: F401
