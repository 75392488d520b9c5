"""The one rule of every command-line tool (tools/*, app.py): a refused input prints one line,
`error: <what is wrong>`, on stderr and exits with status 2; a traceback means a bug.

The project's refused input is a ValueError: every check (the configs' settings, the export's
files, the demo's inputs) raises one with a message naming the input and what is allowed.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

REFUSED_EXIT_CODE = 2  # argparse's own exit status for a bad command line


def one_line(message) -> str:
    """The message with its line breaks (and runs of spaces) folded into single spaces."""
    return " ".join(str(message).split())


def refuse(message) -> None:
    """Prints `error: <message>` as one line on stderr and exits with REFUSED_EXIT_CODE."""
    sys.stderr.write(f"error: {one_line(message)}\n")
    raise SystemExit(REFUSED_EXIT_CODE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals follow the rule: one line `error: ...` (argparse prints
    the usage and `prog: error: ...` on two)."""

    def error(self, message):
        refuse(f"{message} (see `{self.prog} --help`)")


def refusals_as_errors(main):
    """Decorates a tool's main(): a ValueError (a refused input) becomes `error: ...` on one line
    and exit status 2, without a traceback. Any other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def main_with_refusals(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except ValueError as error:
            refuse(error)

    return main_with_refusals


HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def looks_like_hub_id(name: str) -> bool:
    """`owner/name` or `name` as the hub spells repo ids (not a path such as ./x, /x or a/b/c)."""
    return HUB_ID.fullmatch(name) is not None and not name.startswith((".", "/"))


def local_folder(name: str, what: str) -> Path | None:
    """The folder `name` names; None for a hub id that is not a local folder. A ValueError (naming
    `what`) for a file, or for a path that does not exist and cannot be a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{what} {name!r} is a file; give a model folder")
    if not looks_like_hub_id(name):
        raise ValueError(f"{what} folder {name!r} does not exist (and it is not a hub repo id)")
    return None
