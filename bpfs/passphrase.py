"""Where a passphrase comes from (BPFS_PASSPHRASE, a key file, or the terminal), what a new one
must be, and not leaving it behind in the environment.

A new passphrase (one a store is created or recovered with) needs at least MIN_LENGTH
characters; below an estimated WEAK_BITS bits of strength the user is told, once, that it is
weak. The estimate is deliberately simple: length x log2 of the alphabet its characters come
from (lowercase, uppercase, digits, other ASCII, anything else); it cannot see dictionary words,
so it errs on the generous side, and it is advice beyond the hard minimum. Tests (and scripts
that know better) may allow a shorter one with BPFS_ALLOW_WEAK_PASSPHRASE=1.
"""

from __future__ import annotations

import ctypes
import getpass
import math
import os
import sys

from .errors import BpfsError

ENV_VAR = "BPFS_PASSPHRASE"
ALLOW_WEAK_VAR = "BPFS_ALLOW_WEAK_PASSPHRASE"
MIN_LENGTH = 8
WEAK_BITS = 50


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


def strength_bits(passphrase: bytes) -> float:
    """A rough estimate of a passphrase's strength in bits (see the module docstring)."""
    text = passphrase.decode(errors="replace")
    alphabet = 0
    for present, size in ((any(c.islower() and c.isascii() for c in text), 26),
                          (any(c.isupper() and c.isascii() for c in text), 26),
                          (any(c.isdigit() and c.isascii() for c in text), 10),
                          (any(c.isascii() and not c.isalnum() for c in text), 33),
                          (any(not c.isascii() for c in text), 100)):
        alphabet += size if present else 0
    return len(text) * math.log2(alphabet) if alphabet else 0.0


def check_new_passphrase(passphrase: bytes) -> None:
    """Refuse a new passphrase shorter than MIN_LENGTH characters; warn about a weak one."""
    if os.environ.get(ALLOW_WEAK_VAR) == "1":
        return
    length = len(passphrase.decode(errors="replace"))
    if length < MIN_LENGTH:
        raise BpfsError(f"the passphrase has {length} characters: a new one needs at least {MIN_LENGTH} (a few "
                        "words you will remember are best)", exit_code=2)
    bits = strength_bits(passphrase)
    if bits < WEAK_BITS:
        print(f"bpfs: warning: this passphrase is weak (about {bits:.0f} bits; {WEAK_BITS}+ is better): anyone "
              "with a copy of the drive can try passphrases at leisure; a few more words make it much stronger",
              file=sys.stderr)


def read_passphrase(passphrase_file: str | None, confirm: bool = False) -> bytes:
    """The passphrase: from the file, BPFS_PASSPHRASE or the terminal. `confirm`: it is a new
    one (asked twice on a terminal, and held to MIN_LENGTH)."""
    if passphrase_file:
        value = _from_file(passphrase_file)
    elif os.environ.get(ENV_VAR):
        value = os.environ[ENV_VAR].encode()
    elif not sys.stdin.isatty():
        raise BpfsError(f"no passphrase: set {ENV_VAR}, pass --passphrase-file, or run on a terminal", exit_code=2)
    else:
        value = getpass.getpass("New passphrase: " if confirm else "Passphrase: ").encode()
        if not value:
            raise BpfsError("the passphrase must not be empty", exit_code=2)
        if confirm:
            check_new_passphrase(value)
            if getpass.getpass("Passphrase again: ").encode() != value:
                raise BpfsError("the passphrases differ", exit_code=2)
        return value
    if confirm:
        check_new_passphrase(value)
    return value


def scrub_environment(name: str = ENV_VAR) -> bool:
    """Remove `name` from this process's environment, and overwrite the entry in the memory that
    /proc/PID/environ shows (unsetting alone leaves the original bytes there). For a
    long-running daemon, once the passphrase has been used. Returns whether it was there."""
    found = False
    try:
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
        prefix = name.encode() + b"="
        i = 0
        while environ[i]:
            address = environ[i]
            entry = ctypes.string_at(address)
            if entry.startswith(prefix):
                ctypes.memset(address, 0, len(entry))
                found = True
            i += 1
    except (OSError, ValueError, AttributeError):
        pass
    if os.environ.pop(name, None) is not None:
        found = True
    return found
