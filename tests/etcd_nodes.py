"""Private etcd servers for the tests: one node, or a cluster of three on loopback.

Each node runs Debian's ``etcd`` on free ports with its data in a temporary directory (on
``/dev/shm`` when there is one: every lock operation is an fsync), a 50 ms heartbeat and a
500 ms election timeout, so a cluster elects a new leader within about a second.
``BS_COORDINATION_REQUIRE_ETCD=1`` (set by ``.ci/run``) turns a missing ``etcd`` binary into a
test failure instead of a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRE_ETCD = os.environ.get("BS_COORDINATION_REQUIRE_ETCD") == "1"
#: etcd's election timeout in these tests (ms); the heartbeat is a tenth of it.
ELECTION_MS = 500
#: etcd's --max-txn-ops in these tests (default 128): the service suite locks 100 devices in
#: one request. Store URLs say so with ``?max_txn_ops=`` (``EtcdCluster.url``).
MAX_TXN_OPS = 1024


def etcd_binary() -> str | None:
    return shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)


def require_etcd() -> str:
    """The etcd binary, or skip (fail when CI requires etcd)."""
    binary = etcd_binary()
    if binary is None:
        if REQUIRE_ETCD:
            pytest.fail("etcd is not installed (Debian's etcd-server), and CI requires the etcd tests")
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    return binary


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdNode:
    """One etcd member: ``start()``, ``kill()`` (SIGKILL), ``url`` (``etcd://127.0.0.1:PORT``)."""

    def __init__(self, binary: str, name: str, directory: Path, client_port: int, peer_port: int,
                 cluster: str) -> None:
        self.binary, self.name, self.dir = binary, name, directory
        self.client_port, self.peer_port, self.cluster = client_port, peer_port, cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"etcd://{self.endpoint}"

    def start(self) -> None:
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.dir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--name", self.name, "--data-dir", str(self.dir / self.name),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", self.cluster, "--initial-cluster-state", "new",
             "--initial-cluster-token", self.dir.name,
             "--heartbeat-interval", str(ELECTION_MS // 10), "--election-timeout", str(ELECTION_MS),
             "--auto-compaction-mode", "revision", "--auto-compaction-retention", "100000",
             "--max-txn-ops", str(MAX_TXN_OPS),
             "--log-level", "warn", "--logger", "zap"],
            stdout=log, stderr=log)
        log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def status(self) -> dict[str, str] | None:
        """etcd's maintenance status of this member, or None if it does not answer."""
        req = urllib.request.Request(f"http://{self.endpoint}/v3/maintenance/status", data=b"{}",
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=0.5) as resp:
                return json.loads(resp.read())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None


class EtcdCluster:
    """``size`` members on loopback; ``url`` names all of them."""

    def __init__(self, binary: str, directory: Path, size: int) -> None:
        ports = _free_ports(2 * size)
        names = [f"n{i}" for i in range(size)]
        cluster = ",".join(f"{n}=http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names))
        self.nodes = [EtcdNode(binary, n, directory, ports[2 * i], ports[2 * i + 1], cluster)
                      for i, n in enumerate(names)]

    @property
    def url(self) -> str:
        """``etcd://`` and every member; a key prefix may follow, then ``options``."""
        return "etcd://" + ",".join(n.endpoint for n in self.nodes)

    options = f"?max_txn_ops={MAX_TXN_OPS}"

    def start(self, timeout: float = 20.0) -> None:
        for n in self.nodes:
            n.start()
        self.wait_for_leader(timeout)

    def leader(self) -> EtcdNode | None:
        """The member every live member names as leader, if one does."""
        for n in self.nodes:
            if n.proc is None:
                continue
            st = n.status()
            if st and st.get("leader") and st.get("leader") == st["header"]["member_id"]:
                return n
        return None

    def wait_for_leader(self, timeout: float = 20.0) -> EtcdNode:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None:
                return leader
            for n in self.nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    log = (self.nodes[0].dir / f"{n.name}.log").read_text()[-2000:]
                    raise RuntimeError(f"etcd member {n.name} exited:\n{log}")
            time.sleep(0.05)
        raise TimeoutError(f"no etcd leader within {timeout} s")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


@contextmanager
def etcd_cluster(size: int = 1) -> Iterator[EtcdCluster]:
    """A private etcd cluster of ``size`` members (skipped, or failed in CI, without etcd)."""
    binary = require_etcd()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="bs-coord-etcd-", dir=base) as d:
        cluster = EtcdCluster(binary, Path(d), size)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
