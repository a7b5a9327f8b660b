"""Real EPICS parts for the access-security bridge tests.

- ``ca``: Channel Access ports for one test: an IOC port, a bridge port and a repeater port,
  each free for both UDP and TCP on loopback; the environment of every part names them
  explicitly (``EPICS_CA_AUTO_ADDR_LIST=NO``), so tests never reach another CA server.
- ``ioc_factory``: a pythonSoftIOC IOC (``tests/epics/ioc.py``) as a subprocess that loaded an
  access-security file; ``bridge_factory``: ``bs-coordination epics-bridge`` as a subprocess.
  Both are stopped (terminated, then killed) after the test.
- ``ca_users``: caproto threading clients with distinct Channel Access user names.

``BS_COORDINATION_REQUIRE_EPICS=1`` (for CI) turns missing softioc/epicscorelibs/caproto into a
failure instead of a skip.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from ca_parts import Proc

REQUIRE_EPICS = os.environ.get("BS_COORDINATION_REQUIRE_EPICS") == "1"
HERE = Path(__file__).parent


def _missing() -> list[str]:
    return [m for m in ("softioc", "epicscorelibs", "caproto") if importlib.util.find_spec(m) is None]


@pytest.fixture(autouse=True)
def _epics_installed() -> None:
    missing = _missing()
    if missing:
        text = f"{', '.join(missing)} not installed (pip install 'bs-coordination[epics]')"
        if REQUIRE_EPICS:
            pytest.fail(text + ", and CI requires the EPICS tests to run")
        pytest.skip(text)


def free_ca_port() -> int:
    """A port number free on loopback for TCP and UDP at once (CA uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port for TCP and UDP")


@dataclass
class CaPorts:
    ioc: int = field(default_factory=free_ca_port)
    bridge: int = field(default_factory=free_ca_port)
    repeater: int = field(default_factory=free_ca_port)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
        env.update(EPICS_CA_AUTO_ADDR_LIST="NO", EPICS_CAS_INTF_ADDR_LIST="127.0.0.1",
                   EPICS_CA_REPEATER_PORT=str(self.repeater),
                   EPICS_CAS_AUTO_BEACON_ADDR_LIST="NO",
                   EPICS_CAS_BEACON_ADDR_LIST=f"127.0.0.1:{self.repeater}")
        return env

    def ioc_env(self) -> dict[str, str]:
        """The IOC serves on its port; its access-security links find the bridge."""
        return self.base_env() | {"EPICS_CA_SERVER_PORT": str(self.ioc),
                                  "EPICS_CA_ADDR_LIST": f"127.0.0.1:{self.bridge}"}

    def bridge_env(self) -> dict[str, str]:
        return self.base_env() | {"EPICS_CA_SERVER_PORT": str(self.bridge),
                                  "EPICS_CA_ADDR_LIST": f"127.0.0.1:{self.ioc}"}

    def client_env(self) -> dict[str, str]:
        """Clients reach both servers, each on its own port."""
        return {"EPICS_CA_AUTO_ADDR_LIST": "NO",
                "EPICS_CA_ADDR_LIST": f"127.0.0.1:{self.ioc} 127.0.0.1:{self.bridge}",
                "EPICS_CA_REPEATER_PORT": str(self.repeater)}


@pytest.fixture
def ca(monkeypatch: pytest.MonkeyPatch) -> CaPorts:
    """Ports for this test; this process's CA clients search exactly the IOC and the bridge."""
    ports = CaPorts()
    for key in list(os.environ):
        if key.startswith("EPICS_"):
            monkeypatch.delenv(key)
    for key, value in ports.client_env().items():
        monkeypatch.setenv(key, value)
    return ports


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def ioc_factory(ca: CaPorts, procs: list[Proc], tmp_path: Path) -> Any:
    """``ioc_factory(acf_text, {"TST:m1": "m1"}) -> Proc``: an IOC with those ``ao`` records
    (record name -> ASG), access security loaded from ``acf_text``."""

    def start(acf_text: str, records: dict[str, str]) -> Proc:
        acf = tmp_path / "coordination.acf"
        acf.write_text(acf_text)
        args = [sys.executable, str(HERE / "ioc.py"), "--acf", str(acf)]
        for record, asg in records.items():
            args += ["--record", f"{record}={asg}"]
        proc = Proc(args, ca.ioc_env(), "READY")
        procs.append(proc)
        return proc.start()

    return start


@pytest.fixture
def bridge_factory(ca: CaPorts, procs: list[Proc]) -> Any:
    """``bridge_factory(url, prefix, devices, *more_args) -> Proc``: ``bs-coordination
    epics-bridge`` (started: its CA server listens)."""

    def start(url: str, prefix: str, devices: list[str], *extra: str) -> Proc:
        args = [sys.executable, "-m", "bs_coordination.cli", "epics-bridge", "--url", url,
                "--prefix", prefix, *extra]
        for device in devices:
            args += ["--device", device]
        proc = Proc(args, ca.bridge_env(), "lock PVs over Channel Access")
        procs.append(proc)
        return proc.start()

    return start


class CaUser:
    """A Channel Access client whose user name is ``name`` (caproto's threading client), on
    the host it says it is on (``host``; default this machine's name)."""

    def __init__(self, name: str, host: str | None = None) -> None:
        from caproto.threading.client import Context

        self.name, self.host = name, host
        self.context = Context(client_name=name, host_name=host)
        self._pvs: dict[str, Any] = {}

    def pv(self, name: str) -> Any:
        """The connected channel to ``name``. caproto's threading client leaves a new channel
        searching for good once a server was slow to answer a new circuit (a loaded IOC: the
        time-out ends the context's search-results thread; see ``ResumeGate``, which recovers
        the same way): after 10 s without a connection this user starts over once with a
        fresh client context, then gives up."""
        from caproto import CaprotoTimeoutError
        from caproto.threading.client import Context

        if name not in self._pvs:
            for attempt in (1, 2):
                (pv,) = self.context.get_pvs(name, timeout=2.0)
                try:
                    pv.wait_for_connection(timeout=10.0)
                    break
                except CaprotoTimeoutError:
                    if attempt == 2:
                        raise
                    print(f"CA user {self.name}: {name} still searching after 10 s; new context")
                    self.context.disconnect()
                    self.context = Context(client_name=self.name, host_name=self.host)
                    self._pvs.clear()
            self._pvs[name] = pv
        return self._pvs[name]

    def can_write(self, name: str) -> bool:
        """What the IOC grants this user on ``name`` now (it pushes changes to the client)."""
        from caproto import AccessRights

        pv = self.pv(name)
        return bool(pv.connected and pv.access_rights & AccessRights.WRITE)

    def read(self, name: str) -> Any:
        response = self.pv(name).read(data_type="time", timeout=5.0)
        value = response.data[0]
        return value.decode() if isinstance(value, bytes) else value

    def severity(self, name: str) -> int:
        return int(self.pv(name).read(data_type="time", timeout=5.0).metadata.severity)

    def write(self, name: str, value: float) -> float:
        """``caput``: write ``value`` (the IOC answers a refused write without an error) and
        return the value the record holds afterwards."""
        self.pv(name).write([value], wait=True, timeout=5.0)
        return float(self.read(name))

    def close(self) -> None:
        self.context.disconnect()


@pytest.fixture
def ca_users(ca: CaPorts) -> Iterator[Any]:
    """``ca_users("alice", host=None) -> CaUser``; all disconnected after the test."""
    users: dict[tuple[str, str | None], CaUser] = {}

    def get(name: str, host: str | None = None) -> CaUser:
        if (name, host) not in users:
            users[name, host] = CaUser(name, host)
        return users[name, host]

    yield get
    # Each context's disconnect joins its threads (about a second): all at once.
    closing = [threading.Thread(target=user.close) for user in users.values()]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join(30)


@pytest.fixture
def service_process(procs: list[Proc]) -> Any:
    """``service_process() -> (Proc, url)``: the lock service (memory store) as a subprocess on
    a fixed free port, so a test can stop it and start it again on the same URL."""
    def start() -> tuple[Proc, str]:
        port = free_ca_port()
        args = [sys.executable, "-m", "bs_coordination.service", "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "INFO"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("COORDINATION_")}
        proc = Proc(args, env, "Application startup complete")
        procs.append(proc)
        return proc.start(), f"http://127.0.0.1:{port}"

    return start
