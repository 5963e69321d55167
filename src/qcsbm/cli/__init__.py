"""The `qcsbm` command: one subcommand module per user action.

Each subcommand module provides `add_parser(subparsers)` and `run(args) -> int`.
A `UsageError` raised anywhere below becomes one line on stderr and exit code 2.
"""

import argparse
import logging
import sys

from qcsbm import __version__
from qcsbm.errors import NonFiniteError, UsageError

logger = logging.getLogger("qcsbm")


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr with exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every subcommand."""
    from qcsbm.cli import evaluate, import_checkpoint, sample, study, train

    parser = _OneLineParser(
        prog="qcsbm",
        description="Score-based generative models with conservative, unconstrained and "
        "quasi-conservative score fields.",
    )
    parser.add_argument("--version", action="version", version=f"qcsbm {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging level of messages on stderr (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=_OneLineParser)
    for module in (study, train, sample, evaluate, import_checkpoint):
        module.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    """Run the `qcsbm` command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print("qcsbm: error: missing COMMAND; choose one of study, train, sample, eval, "
              "import-checkpoint (see qcsbm --help)", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except UsageError as error:
        message = " ".join(str(error).split())
        print(f"qcsbm {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OverflowError as error:
        detail = error.args[-1] if error.args else error
        print(f"qcsbm {args.command}: error: a value is out of range ({detail}); use smaller "
              "values", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        message = " ".join(str(error).split())
        print(f"qcsbm {args.command}: error: {message}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"qcsbm {args.command}: interrupted", file=sys.stderr)
        return 130
