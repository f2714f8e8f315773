"""Speed and memory measurements (`make bench`); each module is a command (its docstring)."""

import sys


def usage_if_asked(argv: list[str], doc: str | None) -> None:
    """Print the command's `doc` (its usage) and exit 0 where `argv` asks for help."""
    if "-h" in argv or "--help" in argv:
        print((doc or "").strip())
        sys.exit(0)
