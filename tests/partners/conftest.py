"""Fixtures of the partner tests (helpers: tests/helpers/partners.py)."""

from __future__ import annotations

import pytest

from tests.helpers.partners import StoreFactory


@pytest.fixture
def stores(tmp_path):
    """Factory for owners and servers; all stopped, unmounted and killed at teardown."""
    factory = StoreFactory(tmp_path)
    yield factory
    factory.cleanup()
