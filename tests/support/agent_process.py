"""Run ``edge-agent serve`` as a real separate process for tests that use sync clients."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml


class AgentProcess:
    def __init__(self, config: dict, workdir: Path, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        cfg = workdir / "agent.yaml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = open(workdir / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgefleet.agent",
                "serve",
                "--config",
                str(cfg),
                "--port",
                str(port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.started = time.monotonic()
        self.ready_after = self._wait_ready(workdir / "agent.log")

    def _wait_ready(self, log: Path, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.base}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"agent not ready after {timeout} s: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
