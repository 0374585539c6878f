"""Start a real `pvp serve` subprocess on loopback for tests."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    def __init__(self, avatar_dir, *extra, bind="tcp://127.0.0.1:*", threads: int | None = 1):
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "pvp_server.cli", "serve", str(avatar_dir),
                                      "--bind", bind, "--device", "cpu", *map(str, extra)], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
        deadline = time.time() + 60
        line = ""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("pvp serve:") or self.proc.poll() is not None:
                break
        if not line.startswith("pvp serve:"):
            self.stop()
            raise RuntimeError(f"server did not start: {line} {self.proc.stderr.read()[-2000:]}")
        self.endpoint = line.rsplit(" on ", 1)[1].strip()

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
