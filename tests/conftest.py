"""Shared fixtures. Keep this small: most helpers live in importable modules next to it."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from s3server import MotoServer  # noqa: E402


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the whole session (started once, stopped at the end)."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """``(url_root, storage_options)`` of a fresh, empty bucket: ``s3://<bucket>``."""
    return f"s3://{s3_server.new_bucket()}", dict(s3_server.storage_options)
