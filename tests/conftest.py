"""Fixtures and hooks of the bpfs test suite; the helpers they use live in tests/helpers/.

Every test drives the real CLI (``python -m bpfs``) against a real store and a
real FUSE mount.  Nothing is mocked.

Test modules import helpers from tests.helpers (``from tests.helpers.mounts import Mount``),
never from conftest or another test module: hypothesis state machines, for one, cannot use
function-scoped fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.cli import bpfs_env, init_store, new_store
from tests.helpers.mounts import FUSE_AVAILABLE, FUSE_SKIP_REASON, Mount, mount_tmpfs, unmount_tmpfs

# Stores made by tests talk to no broker unless a test names one (--broker / BPFS_BROKER): the
# default public broker is not reachable here, and most tests pair directly.
os.environ.setdefault("BPFS_BROKER", "none")

# Default per-test timeout (seconds) unless a test sets its own.
DEFAULT_TIMEOUT = 300


# --------------------------------------------------------------------------
# pytest configuration
# --------------------------------------------------------------------------

def pytest_configure(config):
    config.addinivalue_line("markers", "heavy: slow test (large data volumes); still part of the normal run")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))
        if not FUSE_AVAILABLE:
            item.add_marker(pytest.mark.skip(reason=FUSE_SKIP_REASON))


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def env():
    return bpfs_env()


@pytest.fixture
def store(tmp_path) -> Path:
    """An initialised, unmounted store (passphrase PASSPHRASE, --kdf interactive)."""
    return new_store(tmp_path)


@pytest.fixture
def make_mount(tmp_path):
    """Factory: make_mount(store=None, name=...) -> Mount (not yet mounted).  All are cleaned up."""
    created: list[Mount] = []

    def factory(store: Path | None = None, name: str = "mnt-extra", init: bool = True) -> Mount:
        if store is None:
            store = tmp_path / f"store-{name}"
            if init:
                init_store(store)
        m = Mount(store, tmp_path / name)
        m.mnt.mkdir(parents=True, exist_ok=True)
        created.append(m)
        return m

    yield factory
    for m in reversed(created):
        m.cleanup()


@pytest.fixture
def mounted(store, tmp_path):
    """The ``store`` fixture mounted at tmp_path/mnt.  Always unmounted at teardown."""
    m = Mount(store, tmp_path / "mnt")
    m.mnt.mkdir()
    try:
        m.mount()
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def plain(tmp_path) -> Path:
    """A plain directory on the host filesystem, for side-by-side comparisons."""
    p = tmp_path / "plain"
    p.mkdir()
    return p


@pytest.fixture
def small_tmpfs(tmp_path):
    """Factory: small_tmpfs(size="64m", name="tmpfs") -> Path of a freshly mounted tmpfs."""
    mounts: list[Path] = []

    def factory(size: str = "64m", name: str = "tmpfs") -> Path:
        d = tmp_path / name
        d.mkdir()
        mount_tmpfs(d, size)
        mounts.append(d)
        return d

    yield factory
    for d in reversed(mounts):
        unmount_tmpfs(d, tmp_path)
