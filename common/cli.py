"""Shared plumbing of the click jobs: known failures become one clear line and a documented exit code."""

from __future__ import annotations

import functools
import sys

import click

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
SEED = click.IntRange(0, 2**63 - 1)


def precision_option(fn):
    """The ``--precision`` option (``auto``, ``fp32``, ``bf16``) of the jobs that run the network; resolved per
    device by ``common.training.resolve_precision``."""
    return click.option(
        "--precision",
        type=click.Choice(["auto", "fp32", "bf16"]),
        default="auto",
        envvar="FACESSL_PRECISION",
        help="Network arithmetic. auto: bf16 autocast in channels_last on CUDA and on CPUs with native bf16 "
        "(avx512_bf16 or amx_bf16), fp32 elsewhere. Losses and softmaxes stay float32.",
    )(fn)
