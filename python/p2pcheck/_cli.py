"""The `p2pcheck` console script: the bundled CLI in this process's place."""

import os
import sys

from ._native import cli_path


def main() -> None:
    """Replaces this process with the bundled p2pcheck CLI, passing the arguments on."""
    path = str(cli_path())
    try:
        os.execv(path, [path] + sys.argv[1:])
    except OSError as e:
        sys.exit(f"p2pcheck: cannot run {path}: {e}")
