"""Harness: starts the real ``shoal`` binary (``$SHOAL_BIN``, default
``target/debug/shoal`` of this repository) as a process on free 127.0.0.1
ports with its own data directory, as ``tests/src/lib.rs`` does for the
Rust integration tests, and stops only what it started, by PID."""

from __future__ import annotations

import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import List, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[3]
ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"


def shoal_bin() -> str:
    p = os.environ.get("SHOAL_BIN") or str(REPO / "target" / "debug" / "shoal")
    if not os.path.exists(p):
        pytest.exit(
            f"{p} not found: build it (cargo build -p shoal-core --bin shoal) or set SHOAL_BIN",
            returncode=3,
        )
    return p


def free_ports(n_after: int) -> int:
    """A base port with ``n_after`` free ports after it, below the kernel's
    ephemeral range (a connect could otherwise pick one as its source)."""
    for _ in range(200):
        base = 10000 + random.randrange(20000)
        socks = []
        try:
            for i in range(n_after + 1):
                s = socket.socket()
                s.bind(("127.0.0.1", base + i))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range found")


def _raise_memlock() -> None:
    # glommio locks its I/O buffers in memory; lift the limit where we may.
    try:
        resource.setrlimit(
            resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        )
    except (ValueError, OSError):
        pass


def cores(n: int = 2) -> str:
    """Cores for an n-shard broker where the machine has them."""
    have = os.cpu_count() or 1
    return ",".join(str(i % have) for i in range(n)) if have >= n else "0"


class Broker:
    """One ``shoal serve`` process."""

    def __init__(
        self, cores: str = "0", extra: Sequence[str] = (), toml: str = "", env: Optional[dict] = None
    ):
        self.env = dict(env or {})
        self.cores = cores
        self.shards = len(cores.split(","))
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-py-"))
        self.data = self.dir / "data"
        self.log = self.dir / "broker.log"
        self.extra = list(extra)
        self.config: Optional[Path] = None
        if toml:
            self.config = self.dir / "shoal.toml"
            self.config.write_text(toml)
        self.port = free_ports(self.shards)
        self.proc: Optional[subprocess.Popen] = None
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        cmd = [
            shoal_bin(),
            "serve",
            "--listen",
            self.addr,
            "--cores",
            self.cores,
            "--data-dir",
            str(self.data),
        ]
        if self.config is not None:
            cmd += ["--config", str(self.config)]
        cmd += self.extra
        ready_before = self.log_text().count("shoal is ready")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, "RUST_LOG": "info", **self.env},
                preexec_fn=_raise_memlock,
            )
        deadline = time.monotonic() + 30
        ports = [self.port + i for i in range(self.shards + 1)]
        while time.monotonic() < deadline:
            if self.log_text().count("shoal is ready") > ready_before and all(
                _connectable(p) for p in ports
            ):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"shoal exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.02)
        self.kill9()
        raise RuntimeError(f"shoal did not become ready:\n{self.log_text()}")

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def terminate(self) -> int:
        """SIGTERM and wait for the exit; returns its code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def restart(self) -> None:
        self.start()

    def cleanup(self) -> None:
        self.kill9()
        shutil.rmtree(self.dir, ignore_errors=True)


def _connectable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class ZooKeeper:
    """A private ZooKeeper (Debian's jars) on a free port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="shoal-py-zk-"))
        self.port = free_ports(0)
        (self.dir / "zoo.cfg").write_text(
            f"tickTime=100\ndataDir={self.dir / 'data'}\nclientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr\nminSessionTimeout=200\nmaxSessionTimeout=20000\n"
        )
        with open(self.dir / "zk.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "java",
                    "-Xmx256m",
                    "-cp",
                    f"/etc/zookeeper/conf:{ZOOKEEPER_JAR}",
                    "org.apache.zookeeper.server.ZooKeeperServerMain",
                    str(self.dir / "zoo.cfg"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._ruok():
                return
            if self.proc.poll() is not None:
                raise RuntimeError((self.dir / "zk.log").read_text(errors="replace"))
            time.sleep(0.05)
        raise RuntimeError("ZooKeeper did not start")

    @property
    def connect(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ruok(self) -> bool:
        """Serving, not only running: `ruok` answers before the server takes
        sessions; `srvr` reports a mode only once it does."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"srvr")
                s.settimeout(1.0)
                out = b""
                while True:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    out += chunk
                return b"Mode:" in out
        except OSError:
            return False

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def zookeeper_available() -> bool:
    return os.path.exists(ZOOKEEPER_JAR) and shutil.which("java") is not None


@pytest.fixture(scope="session")
def broker():
    """One two-shard broker shared by the tests that do not stop it."""
    b = Broker(cores(2))
    yield b
    b.cleanup()


@pytest.fixture
def own_broker():
    """A broker of the test's own (for restarts, corruption)."""
    made: List[Broker] = []

    def make(**kw) -> Broker:
        b = Broker(**kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.cleanup()


@pytest.fixture
def topic_name(request) -> str:
    """A topic name of this test's own."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"{base}-{uuid.uuid4().hex[:8]}"


def run_cli(broker_addr: str, *args: str, stdin: bytes = b"", timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs a ``shoal`` client command against the broker; fails the test
    on a non-zero exit."""
    r = subprocess.run(
        [shoal_bin(), "--broker", broker_addr, *args],
        input=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=timeout,
    )
    assert r.returncode == 0, f"shoal {' '.join(args)} failed ({r.returncode}): {r.stderr.decode(errors='replace')}"
    return r


def pytest_report_header(config):
    import shoal

    return [
        f"shoal package: {os.path.dirname(shoal.__file__)} (CRC32C: {shoal.CRC32C_BACKEND})",
        f"shoal binary: {shoal_bin()}",
    ]
