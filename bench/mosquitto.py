"""A real Mosquitto broker as a subprocess, for the benchmarks and the tests.

``Mosquitto`` runs ``mosquitto -c CONF`` with deploy/mosquitto/edgefleet.conf (the
config edgefleet ships) on a free loopback port in its own directory, and can be
stopped (cleanly or SIGKILL) and started again on the same port with the same
persistence file, for outage tests. ``python -m bench fleet`` runs the fleet against
one; the test suite's fixtures (tests/support/broker_fixtures.py) use the same class
through tests/support/brokers.py. It lives here, not in the tests, so that a benchmark
never imports test code; the tests may import bench (they test it too).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import ROOT, free_port

DEPLOY = ROOT / "deploy" / "mosquitto"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def wait_port(port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("broker process exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing accepts connections on port {port} after {timeout} s")


class Mosquitto:
    """One Mosquitto broker in ``workdir``: config, persistence file and log live there."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        *,
        users: dict[str, str] | None = None,
        acl_file: Path | None = None,
        extra_conf: str = "",
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.users = users
        self.acl_file = acl_file
        self.extra_conf = extra_conf
        self.conf = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def db_path(self) -> Path:
        return self.workdir / "mosquitto.db"

    def _write_conf(self) -> None:
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"persistence_location {self.workdir}/",
            # As root Mosquitto switches to the 'mosquitto' user, who cannot write here.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        ]
        if self.users is not None:
            pw = self.workdir / "passwd"
            pw.write_text("")
            for user, password in self.users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(pw), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl_file is not None:
            lines.append(f"acl_file {self.acl_file}")
        body = (DEPLOY / "edgefleet.conf").read_text()
        self.conf.write_text("\n".join(lines) + "\n" + body + "\n" + self.extra_conf + "\n")

    def start(self, timeout: float = 10.0) -> Mosquitto:
        """Start (or start again, same port, same persistence) and wait until it accepts."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("broker is already running")
        self._write_conf()
        log = open(self.log_path, "ab")  # the child keeps its own copy of the fd
        try:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            log.close()
        proc = self.proc
        try:
            wait_port(self.port, timeout, alive=lambda: proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:
            self.stop(kill=True)
            raise RuntimeError(f"mosquitto did not start: {exc}\n{self.log()[-2000:]}") from exc
        self.starts += 1
        return self

    def stop(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop: SIGTERM (Mosquitto saves its persistence file) or SIGKILL (it does not)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, kill: bool = False, down_s: float = 0.0) -> None:
        self.stop(kill=kill)
        if down_s:
            time.sleep(down_s)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
