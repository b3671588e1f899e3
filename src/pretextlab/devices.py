"""Which torch device a `--device` value means: the one rule training and evaluation share."""

from __future__ import annotations

import torch

from pretextlab.errors import PretextlabError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` means CUDA when present, else CPU; anything else must be a valid, available device."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise PretextlabError(f"unknown device {device!r}: use --device auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise PretextlabError(f"device {str(device)!r} asked for but CUDA is not available here: use --device cpu or auto")
    return resolved
