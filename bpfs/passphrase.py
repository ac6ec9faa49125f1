"""Where a passphrase comes from: BPFS_PASSPHRASE, a key file, or the terminal."""

from __future__ import annotations

import getpass
import os
import sys

from .errors import BpfsError

ENV_VAR = "BPFS_PASSPHRASE"


def _from_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise BpfsError(f"cannot read passphrase file {path}: {e.strerror}", exit_code=2) from None
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    if not data:
        raise BpfsError(f"passphrase file {path} is empty", exit_code=2)
    return data


def read_passphrase(passphrase_file: str | None, confirm: bool = False) -> bytes:
    if passphrase_file:
        return _from_file(passphrase_file)
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR].encode()
    if not sys.stdin.isatty():
        raise BpfsError(f"no passphrase: set {ENV_VAR}, pass --passphrase-file, or run on a terminal", exit_code=2)
    first = getpass.getpass("Passphrase: ").encode()
    if confirm:
        if getpass.getpass("Passphrase again: ").encode() != first:
            raise BpfsError("the passphrases differ", exit_code=2)
    if not first:
        raise BpfsError("the passphrase must not be empty", exit_code=2)
    return first
