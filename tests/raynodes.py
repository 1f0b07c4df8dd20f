"""Ray nodes that tests start with `ray start --block` and stop fast, optionally inside a network
namespace; and the namespaces themselves (veth pairs), made and removed by the test that needs them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

VENV_BIN = str(Path(sys.executable).parent)


def node_env(token: Path, **extra: str) -> dict:
    """Token auth on (`ray start` enables it only where a token exists), and our venv first on PATH so
    a job's `python` is ours."""
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token), **extra}


def start_node(args: list[str], env: dict, netns: str | None = None, log: Path | None = None) -> subprocess.Popen:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([*prefix, f"{VENV_BIN}/ray", "start", "--block", "--disable-usage-stats", *args],
                            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_node(proc: subprocess.Popen, graceful_s: float = 10) -> None:
    """`ray start --block` stops what it started on SIGTERM, in about 30 s; a test node need not wait
    for that: after `graceful_s` its whole process group is killed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=graceful_s)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def kill_node(proc: subprocess.Popen) -> None:
    """A node lost at once: its raylet, object store and workers die together (SIGKILL to the group)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_until(check, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


class VethPair:
    """Two network namespaces joined by a veth pair: `a` at 10.<n>.0.1, `b` at 10.<n>.0.2, each with
    its own loopback. Both ends are named `IFNAME` inside their namespace, so one GLOO_SOCKET_IFNAME
    serves every node."""
    IFNAME = "dteth0"

    def __init__(self, prefix: str, subnet: str = "10.231.0"):
        self.a, self.b = f"{prefix}a", f"{prefix}b"
        self.ip_a, self.ip_b = f"{subnet}.1", f"{subnet}.2"
        self._made: list[str] = []

    def create(self) -> None:
        try:
            for ns in (self.a, self.b):
                self._ip("netns", "add", ns)
                self._made.append(ns)
            va, vb = f"{self.a}-v", f"{self.b}-v"
            self._ip("link", "add", va, "type", "veth", "peer", "name", vb)
            for ns, dev, addr in ((self.a, va, self.ip_a), (self.b, vb, self.ip_b)):
                self._ip("link", "set", dev, "netns", ns)
                self._ip("-n", ns, "link", "set", dev, "name", self.IFNAME)
                self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", self.IFNAME)
                self._ip("-n", ns, "link", "set", self.IFNAME, "up")
                self._ip("-n", ns, "link", "set", "lo", "up")
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        """Deleting a namespace deletes its end of the pair, and with it the other end."""
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if r.returncode:
            raise OSError(f"ip {' '.join(args)}: {r.stderr.strip()}")
