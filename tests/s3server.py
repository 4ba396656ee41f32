"""A real S3-compatible HTTP server on 127.0.0.1 for tests and benchmarks: moto's server mode
in a subprocess, reached through the real s3fs client. Never any other address."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

__all__ = ["MotoServer", "free_port"]

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    """``with MotoServer() as server:`` -> ``server.endpoint``, ``server.storage_options``,
    ``server.new_bucket()``. Credentials are fake and set in ``os.environ`` while it runs."""

    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint}

    def start(self, timeout: float = 60.0) -> "MotoServer":
        os.environ.update(CREDENTIALS)
        self.port = self.port or free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **CREDENTIALS},
        )
        deadline = time.monotonic() + timeout
        # Readiness: the port accepts connections (a refused connect returns at once).
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not listen on {self.endpoint} in {timeout}s")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def new_bucket(self) -> str:
        """Create a fresh bucket and return its name."""
        import s3fs

        name = f"t-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True).mkdir(name)
        return name

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
