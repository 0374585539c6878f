"""`pvp serve` in a subprocess on loopback: for the demo, the tests and the bench scripts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time


def free_endpoint() -> str:
    """A loopback endpoint on a port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


class ServerProcess:
    """Starts the server and waits until it listens (``endpoint``); a context manager that stops it."""

    def __init__(self, avatar_dir, *extra, bind="tcp://127.0.0.1:*", threads: int | None = 1, device: str = "cpu"):
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a log nobody reads must never block the server
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "pvp.cli", "serve", str(avatar_dir),
                                      "--bind", bind, "--device", device, *map(str, extra)],
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("pvp serve:") or self.proc.poll() is not None:
                break
        if not line.startswith("pvp serve:"):
            self.stop()
            raise RuntimeError(f"the server did not start: {line} {self.stderr()[-2000:]}")
        self.endpoint = line.rsplit(" on ", 1)[1].strip()

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def rss_bytes(self) -> int:
        """The server's resident memory (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *_) -> None:
        self.stop()
