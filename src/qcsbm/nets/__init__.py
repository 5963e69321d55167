"""Score networks: NCSN++ for images (`NCSNpp`).

Names are imported on first access, so `import qcsbm.nets` stays cheap.
"""

import importlib

_EXPORTS = {
    "NCSNpp": "qcsbm.nets.ncsnpp",
    "NCSNppConfig": "qcsbm.nets.ncsnpp",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
