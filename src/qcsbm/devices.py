"""Turn a device name from the user into a `torch.device` that works here."""

from __future__ import annotations

import torch

from qcsbm.errors import UsageError


def default_device() -> torch.device:
    """Return CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(name, option: str = "--device") -> torch.device:
    """Return torch.device(name) after allocating a tensor there; raise UsageError if it fails.

    The allocation catches what parsing alone accepts: a CUDA index beyond the visible GPUs,
    or a device type (mps, xpu) that this build of torch lacks.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"invalid {option} {str(name)!r}; expected a device such as 'cpu', "
                         "'cuda' or 'cuda:0'") from None
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"invalid {option} {str(name)!r}: the CPU has no device index "
                         f"{device.index}; use 'cpu'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"invalid {option} {str(name)!r}: CUDA is not available here; use 'cpu'")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):
        # torch's own message lists every dispatch key; it is too long for one line.
        raise UsageError(f"invalid {option} {str(name)!r}: this build of torch cannot "
                         "allocate tensors there; expected a device this machine has, for "
                         "example 'cpu'") from None
    return device
