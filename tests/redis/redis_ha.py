"""Real Redis processes for the high-availability and TLS tests: a primary with a replica and
three Sentinels on loopback, and a TLS-only redis-server with a throwaway CA (made with
``openssl``). Context managers (the tests make them fixtures): every process they start is
stopped on exit.

``BS_COORDINATION_REQUIRE_REDIS=1`` turns a missing binary into a failure, not a skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

#: The name the Sentinels monitor the primary under.
SERVICE = "locks"
#: How long setting up the processes may take.
SETUP_SECONDS = 30.0


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def need(binary: str) -> str:
    """The path of ``binary``, or skip (fail when CI requires the Redis tests)."""
    path = shutil.which(binary)
    if path is None:
        if os.environ.get("BS_COORDINATION_REQUIRE_REDIS") == "1":
            pytest.fail(f"{binary} is not installed, and CI requires the Redis tests to run")
        pytest.skip(f"{binary} is not installed")
    return path


def until(check, what: str, timeout: float = SETUP_SECONDS) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@dataclass
class Proc:
    """One redis-server (or Sentinel) process on a loopback port."""

    args: list[str]
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=5, decode_responses=True, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@dataclass
class SentinelGroup:
    """A primary, its replicas and three Sentinels monitoring them as ``SERVICE``."""

    directory: Path
    servers: list[Proc] = field(default_factory=list)  # primary first
    sentinels: list[Proc] = field(default_factory=list)

    def url(self, query: str = "") -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}" + (f"?{query}" if query else "")

    def primary_port(self) -> int:
        with self.sentinels[0].client() as c:
            _, port = c.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def failover(self) -> None:
        """``SENTINEL FAILOVER``: promote a replica now, without waiting for agreement."""
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", SERVICE)

    def server(self, port: int) -> Proc:
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for p in (*self.sentinels, *self.servers):
            p.stop()


def start_group(directory: Path, server_args: list[str], replicas: int = 1) -> SentinelGroup:
    """Start the primary, its ``replicas`` (all with ``server_args``), wait for them to be in
    sync, then three Sentinels that agree on all of them."""
    binary = need("redis-server")
    sentinel_binary = shutil.which("redis-sentinel")
    group = SentinelGroup(directory)
    try:
        primary_port = _free_port()
        for i in range(1 + replicas):
            port = primary_port if i == 0 else _free_port()
            d = directory / f"redis{i}"
            d.mkdir()
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d),
                    "--save", "", "--appendonly", "no", "--protected-mode", "no",
                    "--logfile", str(d / "redis.log"), *server_args]
            if i:
                args += ["--replicaof", "127.0.0.1", str(primary_port)]
            proc = Proc(args, port, d / "redis.log")
            group.servers.append(proc)
            proc.start()
        def in_sync() -> bool:
            for replica in group.servers[1:]:
                with replica.client() as c:
                    if c.info("replication").get("master_link_status") != "up":
                        return False
            return True

        until(in_sync, "the replica synchronised with the primary")
        for i in range(3):
            d = directory / f"sentinel{i}"
            d.mkdir()
            port = _free_port()
            conf = d / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\nlogfile {d / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")
            args = ([sentinel_binary, str(conf)] if sentinel_binary
                    else [binary, str(conf), "--sentinel"])
            proc = Proc(args, port, d / "sentinel.log")
            group.sentinels.append(proc)
            proc.start()

        def agreed() -> bool:
            for s in group.sentinels:
                with s.client() as c:
                    if (len(c.sentinel_slaves(SERVICE)) != replicas
                            or len(c.sentinel_sentinels(SERVICE)) != 2):
                        return False
            return True

        until(agreed, "the Sentinels found the replica and each other")
    except BaseException:
        group.stop()
        raise
    return group


@contextlib.contextmanager
def sentinel_group(directory: Path, replicas: int = 1) -> Iterator[SentinelGroup]:
    """Primary + ``replicas`` + 3 Sentinels; a primary refuses writes no replica receives
    (``min-replicas-to-write 1``, a replica at most 1 s behind)."""
    group = start_group(directory, ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "1"],
                        replicas)
    try:
        yield group
    finally:
        group.stop()


@dataclass
class TlsServer:
    proc: Proc
    ca: Path

    @property
    def port(self) -> int:
        return self.proc.port


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it:
    (ca.crt, server.crt, server.key)."""
    openssl = need("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "1", "-subj", "/CN=bs-coordination test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=localhost")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "1", "-extfile", "san.cnf")
    return directory / "ca.crt", directory / "server.crt", directory / "server.key"


@contextlib.contextmanager
def tls_redis(tmp_path: Path) -> Iterator[TlsServer]:
    """A redis-server that speaks TLS only (no plain port), its certificate signed by a CA
    made for this test."""
    binary = need("redis-server")
    ca, cert, key = make_certificates(tmp_path)
    port = _free_port()
    proc = Proc([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                 "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                 "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no", "--save", "",
                 "--dir", str(tmp_path), "--logfile", str(tmp_path / "redis.log")],
                port, tmp_path / "redis.log")
    proc.start()
    try:
        def answers() -> bool:
            with redis.Redis(port=port, ssl=True, ssl_ca_certs=str(ca), socket_timeout=2) as c:
                return bool(c.ping())

        until(answers, "the TLS redis-server answered")
        yield TlsServer(proc, ca)
    finally:
        proc.stop()
