"""Shared plumbing of the click jobs: known failures become one clear line and a documented exit code."""

from __future__ import annotations

import functools
import sys
from dataclasses import fields

import click

from facessl.common.config import SEED_MAX
from facessl.common.errors import FacesslError


def report_errors(fn):
    """Decorator for a job's body: FacesslError -> ``error: ...`` on stderr and its ``exit_code``;
    Ctrl-C -> exit 130. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FacesslError as exc:
            click.echo(f"error: {exc}", err=True)
            record_exit_code(exc.exit_code)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def record_exit_code(code: int) -> None:
    """Under torchrun, which exits 1 whatever its ranks exit with, keep the first rank's documented code in
    the file ``$FACESSL_EXIT_CODE_FILE`` names, so the wrapper in the job spec can exit with it (the
    Kubernetes podFailurePolicy acts on codes 2-5). Does nothing when the variable is unset."""
    import os

    path = os.environ.get("FACESSL_EXIT_CODE_FILE")
    if not path:
        return
    try:
        # the first error is the root cause
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError:
        return
    with os.fdopen(fd, "w") as f:
        f.write(f"{code}\n")


def is_main_process() -> bool:
    """False on the non-zero ranks of a torchrun job (they stay quiet; rank 0 reports)."""
    import os

    return os.environ.get("RANK", "0") == "0"


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf`` (usage error, exit 2): a NaN passes every
    range comparison and would otherwise reach the optimizer or the loss."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        import math

        # finiteness first: inf would read as out of range
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def parse_list(value: str | None) -> tuple[str, ...]:
    """Comma-separated option value -> tuple of stripped, non-empty names; () when the option is not given.

    Raises:
        click.BadParameter (exit 2): given, but naming nothing (``","``, spaces), which would mean "all".
    """
    if value is None:
        return ()
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise click.BadParameter(f"{value!r} names nothing: leave the option out to keep them all")
    return names


# what torch.manual_seed and random.seed take: larger seeds overflow
SEED = click.IntRange(0, SEED_MAX)

# every job's click.command settings
COMMAND_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}


def config_option(config, name: str):
    """A click option made from the field ``name`` of a ``common.config`` dataclass: its default, help, bounds
    (``click.IntRange``, :class:`FiniteFloatRange`), choices and environment variable; a bool field becomes an
    ``--x/--no-x`` switch. The parameter keeps the field's name, so ``Config(**options)`` takes the values.

    Raises:
        KeyError: ``config`` has no such field (a programming error).
    """
    spec = {f.name: f for f in fields(config)}[name]
    meta = spec.metadata
    flag = meta["flag"] or "--" + name.replace("_", "-")
    kind = str(spec.type).replace(" | None", "")
    settings = {"default": spec.default, "help": meta["help"], "envvar": meta["envvar"]}
    if kind == "bool":
        return click.option(f"{flag}/--no-{flag[2:]}", name, **settings)
    if meta["choices"]:
        settings["type"] = click.Choice(list(meta["choices"]))
    elif kind == "int":
        settings["type"] = click.IntRange(min=meta["min"], max=meta["max"], min_open=meta["min_open"])
    elif kind == "float":
        settings["type"] = FiniteFloatRange(min=meta["min"], max=meta["max"], min_open=meta["min_open"])
    return click.option(flag, name, **settings)


def config_options(config, *names: str):
    """Decorator adding :func:`config_option` for each of ``names``, listed in ``--help`` in that order."""

    def decorate(fn):
        # click lists the option applied last first
        for name in reversed(names):
            fn = config_option(config, name)(fn)
        return fn

    return decorate


def data_option(help: str):
    """``--data`` (parameter ``data_location``): the prepared dataset a job reads."""
    return click.option("--data", "data_location", required=True, help=help)


def output_option(help: str):
    """``--output`` (parameter ``output_location``): where a job writes."""
    return click.option("--output", "output_location", required=True, help=help)


def image_size_option(config):
    """``--image-size`` as ``config`` declares it (its default and help differ per job)."""
    return config_option(config, "image_size")


def seed_option(config):
    """``--seed`` as ``config`` declares it."""
    return config_option(config, "seed")


def device_option(config):
    """``--device`` (``FACESSL_DEVICE``) as ``config`` declares it."""
    return config_option(config, "device")


def precision_option(config):
    """``--precision`` (``FACESSL_PRECISION``) as ``config`` declares it; resolved per device by
    ``common.training.resolve_precision``."""
    return config_option(config, "precision")
