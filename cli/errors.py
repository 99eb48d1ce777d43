"""One place that turns errors into one line on stderr and exit code 2 (``--debug`` re-raises instead).

Every command runs inside `OneLineErrors.invoke`, so no command maps errors itself. Mapped:
    - the library's errors about its input: ValueError and its subclasses (RunDirError, IncompatibleRunsError,
      RunSelectionError, bad numbers from `check_config`, unknown task / method / option);
    - ModuleNotFoundError for an optional package (its message names the pip command);
    - OSError (a folder that cannot be written, a run directory that already exists).
Anything else is a bug and keeps its traceback. Typer's own usage errors (a missing argument, "abc" for an
integer) keep typer's message, also with exit code 2. Warnings (the probe's, ``compare --force``) print as
one ``warning: ...`` line each.
"""

from __future__ import annotations

import sys
import warnings

import typer
from typer.core import TyperGroup

from .render import escape_controls

EXIT_CODE = 2  # the code typer uses for usage errors: what was asked for cannot be done
MAPPED = (ValueError, ModuleNotFoundError, OSError)


def one_line(message: object) -> str:
    """A message on one line, control characters escaped: a message wrapped by a third party (pyarrow) may
    span several, and one quoting a run's names may hold terminal escape sequences."""
    return escape_controls(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


class OneLineErrors(TyperGroup):
    """The app's command group: runs the chosen command, mapping its errors (see the module docstring)."""

    def invoke(self, ctx):
        debug = bool(ctx.params.get("debug"))  # the app callback's --debug, parsed before any command runs
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except MAPPED as exc:
                if debug:
                    raise
                typer.echo(f"error: {one_line(exc) or type(exc).__name__}", err=True)
                raise typer.Exit(EXIT_CODE) from None


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr)
