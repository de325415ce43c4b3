"""Shared plumbing of the click jobs: known failures become one clear line and a documented exit code."""

from __future__ import annotations

import functools
import sys

import click

from common.errors import FacesslError


def report_errors(fn):
    """Decorator for a job's body: FacesslError -> ``error: ...`` on stderr and its ``exit_code``;
    Ctrl-C -> exit 130. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FacesslError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (they stay quiet; rank 0 reports)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def parse_list(value: str | None) -> tuple[str, ...]:
    """Comma-separated option value -> tuple of stripped, non-empty names."""
    if not value:
        return ()
    return tuple(v.strip() for v in value.split(",") if v.strip())
