"""What every command-line tool does with a user's mistake: one line on stderr, exit 2.

A user error (a missing or wrong file, a corpus that does not match a checkpoint,
a malformed flag) is reported as `error: <what is wrong>; <what to do>`, with no
traceback, and the process exits 2, as argparse does for a bad flag. Ctrl-C exits
130 (128 + SIGINT), as shells expect.
"""
from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def user_error(message: str) -> int:
    """Print `error: message` on stderr and return the exit status for a user error."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def comma_names(text: str) -> list[str]:
    """An argparse `type` for a comma-separated list of names (columns, features, classes)."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give one or more names, comma-separated")
    return names
