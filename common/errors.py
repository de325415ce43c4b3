"""Exceptions the jobs turn into clear messages and documented exit codes.

Exit codes (see README, "Exit codes"):
    0  success
    2  usage error (bad options; click's own code)
    3  bad input data: retrying will not help
    4  transient storage or network failure, or stopped by SIGTERM after a checkpoint: retry and resume
    5  training diverged (loss became NaN or infinite); the last good checkpoint is kept
"""

EXIT_BAD_INPUT = 3
EXIT_RETRY = 4
EXIT_DIVERGED = 5


class FacesslError(Exception):
    """Base class of the errors a job reports without a traceback; ``exit_code`` is the process status."""

    exit_code = 1


class UsageError(FacesslError):
    """An option value that cannot work (unknown device, empty location...)."""

    exit_code = 2


class BadInputError(FacesslError):
    """The input data cannot be used (missing dataset, unknown class, unreadable checkpoint...)."""

    exit_code = EXIT_BAD_INPUT


class StorageError(FacesslError):
    """A storage or network operation failed in a way a retry may fix (timeouts, 5xx, connection errors)."""

    exit_code = EXIT_RETRY


class DivergedError(FacesslError):
    """The training loss became NaN or infinite."""

    exit_code = EXIT_DIVERGED


class PreemptedError(FacesslError):
    """SIGTERM arrived; the job stopped at a safe point (training: after a checkpoint, so rerunning resumes;
    prepare-data: before writing anything, so rerunning starts over)."""

    exit_code = EXIT_RETRY
