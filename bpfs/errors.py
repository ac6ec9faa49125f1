"""Errors that reach the user: each carries a one-line message and an exit code."""


class BpfsError(Exception):
    """A failure to report to the user as one line, with a non-zero exit code."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class WrongPassphrase(BpfsError):
    """The passphrase (or key file) does not unlock the store."""

    exit_code = 2


class StoreNotFound(BpfsError):
    """The given path holds no bpfs store."""

    exit_code = 2


class StoreBusy(BpfsError):
    """Another process (a mount daemon) holds the store."""

    exit_code = 3


class IntegrityError(Exception):
    """Authenticated data did not verify: corrupted, truncated, swapped or forged."""


def first_error(eg: BaseException) -> BaseException:
    """The first real failure inside a (trio nursery's) exception group, not a cancellation:
    the error to report as one line. Any other exception is itself."""
    import trio

    leaves = []

    def walk(e):
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(eg)
    for e in leaves:
        if not isinstance(e, trio.Cancelled):
            return e
    return eg
