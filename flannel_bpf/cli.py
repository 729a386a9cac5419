"""The `flannel-bpf` command line: a thin dispatcher over the controller, loader and lab."""
from __future__ import annotations

import argparse
import logging
import sys

from rich.logging import RichHandler

from flannel_bpf import __version__, commands
from flannel_bpf.console import make_console
from flannel_bpf.usage import UsageError

log = logging.getLogger("flannel-bpf")


def setup_logging(verbose: bool) -> None:
    """rich on a terminal; one plain line per event otherwise (journald, log files)."""
    if sys.stderr.isatty():
        handler = RichHandler(console=make_console(stderr=True), show_path=False, rich_tracebacks=False,
                              log_time_format="%H:%M:%S")
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        handlers=[handler], force=True)
    # etcd3/grpc and pyroute2 are chatty at INFO; their problems reach us as exceptions anyway.
    for noisy in ("pyroute2", "grpc", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class OneLineErrorParser(argparse.ArgumentParser):
    """A bad flag is one line naming it (the usage is one --help away, not printed first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="flannel-bpf", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flannel-bpf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command module registers its own parser and handler: add_parser(sub) -> None.
    for module in commands.ALL:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(args.verbose)
    try:
        return args.handler(args) or 0
    except UsageError as err:
        log.error("%s", err)
        return 2
    except KeyboardInterrupt:
        return 130
