"""`qcsbm evaluate`: not built yet; the subcommand is registered so that --help lists it."""


def add_parser(subparsers) -> None:
    """Register the subcommand."""
    parser = subparsers.add_parser("evaluate", help="(not built yet)")
    parser.set_defaults(run=run)


def run(args) -> int:
    """Run the subcommand."""
    from qcsbm.errors import UsageError

    raise UsageError("this command is not available yet")
