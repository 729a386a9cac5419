"""The one place terminal output is set up: rich, at the terminal's width, or wide enough for
our tables when the output goes to a file or a pipe (rich would assume 80 columns and cut
names and addresses short)."""
from __future__ import annotations

import os
import sys

from rich.console import Console

PIPE_WIDTH = 160


def make_console(stderr: bool = False, **options) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=PIPE_WIDTH if wide else None, **options)
