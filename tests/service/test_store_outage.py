"""With the store (Redis) down: the log says so once and counts the refused requests, and the
waits are bounded by settings (``--store-timeout``, ``--ready-timeout``)."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from bs_coordination.service.config import Settings, parse_settings

LOCK = {"device_name": "m1", "lock_type": "MANUAL_OPERATOR", "user_id": "alice"}
OUTAGE_LOGGER = "bs_coordination.service.outage"


def wait_until(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_an_outage_is_logged_once_and_its_refusals_counted(redis_server, service_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="bs_coordination")
    service = service_factory(redis_server.url)
    with httpx.Client(base_url=service.url, timeout=30) as http:
        assert http.get("/api/health/ready").status_code == 200
        redis_server.stop()
        answers = [http.post("/api/lock/request", json=LOCK).status_code for _ in range(20)]
        assert answers == [503] * 20
        outage = [r for r in caplog.records if r.name == OUTAGE_LOGGER and r.levelno >= logging.WARNING]
        assert len(outage) == 1 and "lock store unavailable" in outage[0].getMessage()
        # Nothing else logs a warning per refused request.
        per_request = [r for r in caplog.records if r.levelno >= logging.WARNING
                       and "/api/lock/request" in r.getMessage()]
        assert per_request == []

        redis_server.start()
        wait_until(lambda: http.get("/api/health/ready").status_code == 200, "ready again")
        records = wait_until(
            lambda: [r for r in caplog.records if r.name == OUTAGE_LOGGER
                     and r.levelno >= logging.WARNING][1:], "the outage's end is logged")
        assert len(records) == 1
        assert "available again" in records[0].getMessage()
        assert "20 request(s) were refused" in records[0].getMessage()
        assert http.post("/api/lock/request", json=LOCK).status_code == 200
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) < 10, [r.getMessage() for r in warnings]


@contextmanager
def paused(redis_server) -> Iterator[None]:
    """Redis hangs (SIGSTOP): connections open, no reply comes."""
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def test_the_store_timeout_bounds_the_wait_for_a_hung_redis(redis_server, service_factory):
    # The store gives up (0.3 s, once retried) long before the probe would (3 s): the probe's
    # reason is the store's timeout, not its own.
    service = service_factory(redis_server.url, store_timeout=0.3, ready_timeout=3)
    with httpx.Client(base_url=service.url, timeout=30) as http:
        assert http.post("/api/lock/request", json=LOCK).status_code == 200
        with paused(redis_server):
            r = http.get("/api/health/ready")
            assert r.status_code == 503
            assert "Timeout" in r.json()["reason"] and "no answer within" not in r.json()["reason"]
            r = http.post("/api/lock/request", json={**LOCK, "device_name": "m2"})
            assert r.status_code == 503 and "lock store unavailable" in r.json()["message"]
        wait_until(lambda: http.get("/api/health/ready").status_code == 200, "ready again")
        assert [lk["device_name"] for lk in http.get("/api/locks/status").json()["locks"]] == ["m1"]


def test_the_ready_timeout_bounds_the_probe(redis_server, service_factory):
    # The store would wait 5 s (twice): the probe answers at its own bound first.
    service = service_factory(redis_server.url, store_timeout=5, ready_timeout=0.3)
    with httpx.Client(base_url=service.url, timeout=30) as http:
        assert http.get("/api/health/ready").status_code == 200
        with paused(redis_server):
            r = http.get("/api/health/ready")
            assert r.status_code == 503
            assert "no answer within 0.3 s" in r.json()["reason"]
        wait_until(lambda: http.get("/api/health/ready").status_code == 200, "ready again")


def test_timeout_settings_from_flags_and_environment(capsys):
    assert (Settings().store_timeout, Settings().ready_timeout) == (2.0, 2.0)
    s = parse_settings(["--store-timeout", "0.5", "--ready-timeout", "1"], {})
    assert (s.store_timeout, s.ready_timeout) == (0.5, 1.0)
    s = parse_settings([], {"COORDINATION_STORE_TIMEOUT": "3", "COORDINATION_READY_TIMEOUT": "4"})
    assert (s.store_timeout, s.ready_timeout) == (3.0, 4.0)
    s = parse_settings(["--store-timeout", "1"], {"COORDINATION_STORE_TIMEOUT": "3"})
    assert s.store_timeout == 1.0
    for argv, env, named in [(["--store-timeout", "soon"], {}, "--store-timeout"),
                             (["--store-timeout", "0"], {}, "--store-timeout"),
                             (["--ready-timeout", "-1"], {}, "--ready-timeout"),
                             (["--ready-timeout", "nan"], {}, "--ready-timeout"),
                             ([], {"COORDINATION_READY_TIMEOUT": "600"}, "COORDINATION_READY_TIMEOUT"),
                             ([], {"COORDINATION_STORE_TIMEOUT": "x"}, "COORDINATION_STORE_TIMEOUT")]:
        with pytest.raises(SystemExit) as info:
            parse_settings(argv, env)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


def test_help_documents_the_timeouts():
    r = subprocess.run([sys.executable, "-m", "bs_coordination.service", "--help"],
                       capture_output=True, text=True, timeout=60)
    text = " ".join(r.stdout.split())
    for name in ("--store-timeout", "COORDINATION_STORE_TIMEOUT", "--ready-timeout",
                 "COORDINATION_READY_TIMEOUT"):
        assert name in text
