"""Exceptions that carry a message meant for the user.

The command-line interface prints a `UsageError` as one line on stderr and exits with code 2.
Library code raises it (or a subclass) for bad input, always naming the argument, the value
and what is allowed.
"""

import math


class UsageError(ValueError):
    """Invalid input from the user: an option, a config value, a file or a data set."""


class CheckpointError(UsageError):
    """A checkpoint file that cannot be loaded: missing, truncated, unsafe or mismatched."""


class NonFiniteError(RuntimeError):
    """A loss, penalty or gradient became NaN or infinite during training."""


def check_choice(name: str, value, allowed) -> None:
    """Raise UsageError unless `value` is one of `allowed`."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise UsageError(f"invalid {name} {value!r}; expected one of {choices}")


def check_finite(name: str, value) -> None:
    """Raise UsageError unless `value` is a finite number."""
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise UsageError(f"invalid {name} {value!r}; expected a finite number")


def check_positive(name: str, value, *, allow_zero: bool = False) -> None:
    """Raise UsageError unless `value` is a finite number > 0 (or >= 0 with `allow_zero`)."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise UsageError(f"invalid {name} {value!r}; expected a finite number {bound}")
