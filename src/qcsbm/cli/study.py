"""`qcsbm study NAME`: run one of the paper's studies and write its metrics and figures.

`STUDIES` lists every study with the module that implements it. A study module provides
`add_arguments(parser)` and `run(args) -> int`. To add a study, write that module and add a
row to the table. A listed module that is not installed yet still gets a subcommand, which
fails with a one-line error.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from qcsbm.errors import UsageError

# Study name -> (module, one-line help).
STUDIES = {
    "toy2d": ("qcsbm.studies.toy2d",
              "USBM, CSBM and QCSBM on 2-D toy data: sample quality, likelihood, asymmetry"),
    "gaussian": ("qcsbm.studies.gaussian",
                 "Langevin sampling of a 2-D Gaussian with a rotational or radial score error"),
    "autoencoder": ("qcsbm.studies.autoencoder",
                    "a one-layer autoencoder score trained with the QC penalty alone"),
}


def _import_study(module_name: str):
    """Import a study module, or return None if that module itself does not exist."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        return None


def _missing_study(name: str, module_name: str):
    def run(args) -> int:
        raise UsageError(f"study {name!r} is not available in this installation "
                         f"(module {module_name} is missing); "
                         f"available: {', '.join(_available())}")

    return run


def _available() -> list[str]:
    return [name for name, (module, _) in STUDIES.items() if _import_study(module) is not None]


def add_parser(subparsers) -> None:
    """Register `study` with one subcommand per row of STUDIES."""
    parser = subparsers.add_parser(
        "study", help="run one of the paper's studies",
        description="Run one of the paper's studies and write its metrics and figures.")
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    for name, (module_name, help_text) in STUDIES.items():
        module = _import_study(module_name)
        if module is None:
            sub = studies.add_parser(name, help=f"{help_text} (not available yet)")
            sub.set_defaults(study_run=_missing_study(name, module_name))
            continue
        sub = studies.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(study_run=module.run)
    parser.set_defaults(run=run)


def run(args) -> int:
    """Run the study that the command line chose.

    When the study fails before it has written any results (metrics.json), the files it
    wrote into a new or empty output folder are removed, so a refused or crashed run leaves
    nothing behind. A run that stops later keeps its partial results.
    """
    out = Path(args.out) if getattr(args, "out", None) else None
    existed = out is not None and out.exists()
    empty = out is not None and (not existed or (out.is_dir() and not any(out.iterdir())))
    try:
        return args.study_run(args)
    except Exception:
        if empty and out.is_dir() and not (out / "metrics.json").exists():
            _remove_written(out, keep_folder=existed)
        raise


def _remove_written(out: Path, *, keep_folder: bool) -> None:
    """Remove what a failed study wrote into `out`, and `out` itself unless it existed."""
    if not keep_folder:
        shutil.rmtree(out, ignore_errors=True)
        return
    for item in out.iterdir():
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)
