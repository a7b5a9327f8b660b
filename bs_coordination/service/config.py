"""Service settings: every setting is a command-line flag and an environment variable, flag first.

``parse_settings(argv, environ)`` validates everything before the service starts; a bad value
stops it with one line that names the setting (``error: --port: must be 1..65535, got 'abc'``)
and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 60620
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
STORE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "etcd://")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

#: Per-WebSocket queue of undelivered events; a subscriber that falls this far behind is dropped.
DEFAULT_WS_QUEUE_SIZE = 1000
#: Largest request body accepted (bytes); larger ones get 413.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
#: Seconds a preemptor waits for displaced holders to acknowledge (the preemption handshake).
DEFAULT_PREEMPT_ACK_TIMEOUT = 2.0
#: Longest acknowledgement deadline accepted: a dead holder must never hold maintenance long.
MAX_PREEMPT_ACK_TIMEOUT = 60.0
#: Seconds a lock operation waits for the store's (Redis's) reply before answering 503.
DEFAULT_STORE_TIMEOUT = 2.0
#: Seconds the readiness probe waits for the store before answering 503.
DEFAULT_READY_TIMEOUT = 2.0
#: Longest store or readiness timeout accepted: a hung store must be reported, not waited on.
MAX_STORE_TIMEOUT = 60.0


@dataclass
class Settings:
    """Everything the service can be configured with (see ``--help``)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    #: ``memory`` or a ``redis://host:port/db`` URL.
    store: str = "memory"
    profile_collection: str | None = None
    strict_devices: bool = False
    #: ``auto``, ``yaml`` or ``load`` (see ``bs_coordination.service.discovery``).
    discovery: str = "auto"
    #: Seconds one discovery may take before its child process is killed.
    discovery_timeout: float = 60.0
    #: Seconds one preflight dry run may take (``POST /api/preflight``).
    preflight_timeout: float = 10.0
    #: Path of the API-key file; ``None`` leaves authentication off.
    api_keys: str | None = None
    log_level: str = "INFO"
    cors_origins: list[str] = field(default_factory=list)
    ws_queue_size: int = DEFAULT_WS_QUEUE_SIZE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: Seconds a preemptor's answer waits for the displaced holders' acknowledgement.
    preempt_ack_timeout: float = DEFAULT_PREEMPT_ACK_TIMEOUT
    #: Seconds a lock operation waits for a reply from the store (Redis) before answering 503.
    store_timeout: float = DEFAULT_STORE_TIMEOUT
    #: Seconds the readiness probe waits for the store before answering 503.
    ready_timeout: float = DEFAULT_READY_TIMEOUT


class SettingsError(ValueError):
    """A bad setting: the message starts with the flag or variable that holds it."""


# (flag, environment variable, help). The store has a second variable, handled below.
_OPTIONS: list[tuple[str, str, str]] = [
    ("--host", "COORDINATION_HOST", f"interface to listen on (default {DEFAULT_HOST})"),
    ("--port", "COORDINATION_PORT", f"TCP port to listen on, 1..65535 (default {DEFAULT_PORT})"),
    ("--store", "COORDINATION_STORE",
     "where locks live: 'memory' (default, one process), a redis://host:port/db URL "
     "(also rediss:// with TLS, unix://, or redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE"
     "[/DB]; also selected by COORDINATION_REDIS_URL), or an etcd v3 cluster: "
     "etcd://HOST:PORT[,HOST:PORT...][/KEY_PREFIX][?max_txn_ops=N]"),
    ("--profile-collection", "COORDINATION_PROFILE_COLLECTION",
     "profile collection whose devices are discovered: a directory holding startup/, the "
     "startup directory, a startup script or a startup module name"),
    ("--discovery", "COORDINATION_DISCOVERY",
     "how devices are discovered: auto (default: the collection's "
     "existing_plans_and_devices.yaml when it has one, else run its startup code), yaml, load"),
    ("--discovery-timeout", "COORDINATION_DISCOVERY_TIMEOUT",
     "seconds one discovery may take before its process is killed (default 60)"),
    ("--preflight-timeout", "COORDINATION_PREFLIGHT_TIMEOUT",
     "seconds one preflight dry run of a plan may take before it is stopped (default 10)"),
    ("--strict-devices", "COORDINATION_STRICT_DEVICES",
     "refuse device names the profile collection does not define (404)"),
    ("--api-keys", "COORDINATION_API_KEYS",
     "JSON or YAML file of hashed API keys; turns authentication on"),
    ("--log-level", "COORDINATION_LOG_LEVEL",
     f"log level: {', '.join(LOG_LEVELS)} (default INFO)"),
    ("--cors-origins", "COORDINATION_CORS_ORIGINS",
     "comma-separated origins allowed by CORS (default: none, CORS closed)"),
    ("--ws-queue-size", "COORDINATION_WS_QUEUE_SIZE",
     f"events buffered per WebSocket before a slow subscriber is dropped "
     f"(default {DEFAULT_WS_QUEUE_SIZE})"),
    ("--max-body-bytes", "COORDINATION_MAX_BODY_BYTES",
     f"largest request body in bytes; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES})"),
    ("--preempt-ack-timeout", "COORDINATION_PREEMPT_ACK_TIMEOUT",
     "seconds a preempting request waits for the displaced holders to acknowledge that they "
     f"stopped using the device, 0 < s <= {MAX_PREEMPT_ACK_TIMEOUT:g} "
     f"(default {DEFAULT_PREEMPT_ACK_TIMEOUT:g})"),
    ("--store-timeout", "COORDINATION_STORE_TIMEOUT",
     "seconds to wait for a reply from the store (Redis) before answering 503: with Redis "
     "hung, a lock request answers within about this, a status within about twice this, "
     f"0 < s <= {MAX_STORE_TIMEOUT:g} (default {DEFAULT_STORE_TIMEOUT:g}; an unreachable Redis "
     "that refuses connections is answered at once)"),
    ("--ready-timeout", "COORDINATION_READY_TIMEOUT",
     "seconds the readiness probe (/api/health/ready) waits for the store before answering "
     f"503, 0 < s <= {MAX_STORE_TIMEOUT:g} (default {DEFAULT_READY_TIMEOUT:g})"),
]


class _Parser(argparse.ArgumentParser):
    """argparse, but every error is one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m bs_coordination.service",
        description="Run the bs-coordination device lock service. Every flag also reads an "
        "environment variable (shown in brackets); the flag wins.",
    )
    for flag, env, text in _OPTIONS:
        dest = flag[2:].replace("-", "_")
        if flag == "--strict-devices":
            parser.add_argument(flag, dest=dest, action="store_true", default=None,
                                help=f"{text} [{env}=1]")
        else:
            parser.add_argument(flag, dest=dest, default=None, metavar=dest.upper(),
                                help=f"{text} [{env}]")
    return parser


def _port(where: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise SettingsError(f"{where}: must be 1..65535, got {raw!r}")
    return port


def _store(where: str, raw: str) -> str:
    value = raw.strip()
    if value.startswith("etcd://"):
        from bs_coordination.stores.etcd import parse_url

        try:
            parse_url(value)
        except ValueError as exc:
            raise SettingsError(f"{where}: {exc}") from None
        return value
    if value in ("memory", "memory://") or value.startswith(STORE_SCHEMES):
        return "memory" if value.startswith("memory") else value
    raise SettingsError(f"{where}: must be 'memory', a redis:// (rediss://, unix://, "
                        f"redis+sentinel://) URL or an etcd:// URL, got {raw[:80]!r}")


def _log_level(where: str, raw: str) -> str:
    value = raw.strip().upper()
    if value not in LOG_LEVELS:
        raise SettingsError(f"{where}: must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return value


def _existing(where: str, raw: str, *, directory: bool) -> str:
    path = Path(raw).expanduser()
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        what = "directory" if directory else "file"
        raise SettingsError(f"{where}: no such {what}: {raw!r}")
    return str(path)


def _collection(where: str, raw: str) -> str:
    """An existing directory or file, or a startup module name (``beamline.startup``)."""
    path = Path(raw).expanduser()
    if path.exists():
        return str(path)
    if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", raw):
        return raw
    raise SettingsError(f"{where}: no such directory, file or module: {raw!r}")


def _seconds(where: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < 1e6:
        raise SettingsError(f"{where}: must be a positive number of seconds, got {raw!r}")
    return value


def _ack_timeout(where: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_PREEMPT_ACK_TIMEOUT:
        raise SettingsError(f"{where}: must be a number of seconds > 0 and <= "
                            f"{MAX_PREEMPT_ACK_TIMEOUT:g}, got {raw!r}")
    return value


def _store_timeout(where: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= MAX_STORE_TIMEOUT:
        raise SettingsError(f"{where}: must be a number of seconds > 0 and <= "
                            f"{MAX_STORE_TIMEOUT:g}, got {raw!r}")
    return value


def _flag(where: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{where}: must be one of 1/0, true/false, yes/no, on/off, got {raw!r}")


def _queue_size(where: str, raw: str) -> int:
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise SettingsError(f"{where}: must be a positive integer, got {raw!r}")
    return size


def settings_from(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    """Build ``Settings`` from flags and environment; raise ``SettingsError`` on a bad value.

    ``argparse`` handles ``--help`` and unknown flags (both exit).
    """
    args = vars(build_parser().parse_args(list(argv) if argv is not None else []))

    def pick(flag: str, env: str) -> tuple[str, str] | None:
        """(where, raw value) of the flag, else the variable, else None."""
        dest = flag[2:].replace("-", "_")
        if args.get(dest) is not None:
            return flag, args[dest]
        if environ.get(env):
            return env, environ[env]
        return None

    s = Settings()
    if (v := pick("--host", "COORDINATION_HOST")) is not None:
        if not v[1].strip():
            raise SettingsError(f"{v[0]}: must not be empty")
        s.host = v[1].strip()
    if (v := pick("--port", "COORDINATION_PORT")) is not None:
        s.port = _port(*v)
    v = pick("--store", "COORDINATION_STORE")
    if v is None and environ.get("COORDINATION_REDIS_URL"):
        v = ("COORDINATION_REDIS_URL", environ["COORDINATION_REDIS_URL"])
    if v is not None:
        s.store = _store(*v)
    if (v := pick("--profile-collection", "COORDINATION_PROFILE_COLLECTION")) is not None:
        s.profile_collection = _collection(*v)
    if (v := pick("--discovery", "COORDINATION_DISCOVERY")) is not None:
        if v[1].strip().lower() not in ("auto", "yaml", "load"):
            raise SettingsError(f"{v[0]}: must be auto, yaml or load, got {v[1]!r}")
        s.discovery = v[1].strip().lower()
    if (v := pick("--discovery-timeout", "COORDINATION_DISCOVERY_TIMEOUT")) is not None:
        s.discovery_timeout = _seconds(*v)
    if (v := pick("--preflight-timeout", "COORDINATION_PREFLIGHT_TIMEOUT")) is not None:
        s.preflight_timeout = _seconds(*v)
    if args.get("strict_devices"):
        s.strict_devices = True
    elif environ.get("COORDINATION_STRICT_DEVICES") is not None:
        s.strict_devices = _flag("COORDINATION_STRICT_DEVICES",
                                 environ["COORDINATION_STRICT_DEVICES"])
    if (v := pick("--api-keys", "COORDINATION_API_KEYS")) is not None:
        s.api_keys = _existing(*v, directory=False)
        _check_key_file(v[0], s.api_keys)
    if (v := pick("--log-level", "COORDINATION_LOG_LEVEL")) is not None:
        s.log_level = _log_level(*v)
    if (v := pick("--cors-origins", "COORDINATION_CORS_ORIGINS")) is not None:
        s.cors_origins = [o.strip() for o in v[1].split(",") if o.strip()]
    if (v := pick("--ws-queue-size", "COORDINATION_WS_QUEUE_SIZE")) is not None:
        s.ws_queue_size = _queue_size(*v)
    if (v := pick("--max-body-bytes", "COORDINATION_MAX_BODY_BYTES")) is not None:
        s.max_body_bytes = _queue_size(*v)  # any positive integer
    if (v := pick("--preempt-ack-timeout", "COORDINATION_PREEMPT_ACK_TIMEOUT")) is not None:
        s.preempt_ack_timeout = _ack_timeout(*v)
    if (v := pick("--store-timeout", "COORDINATION_STORE_TIMEOUT")) is not None:
        s.store_timeout = _store_timeout(*v)
    if (v := pick("--ready-timeout", "COORDINATION_READY_TIMEOUT")) is not None:
        s.ready_timeout = _store_timeout(*v)
    return s


def _check_key_file(where: str, path: str) -> None:
    """Load the API-key file once now, so a bad one stops the service before it starts."""
    from bs_coordination.apikeys import KeyFileError, KeyRing

    try:
        KeyRing.from_file(path)
    except KeyFileError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def parse_settings(argv: Sequence[str] | None = None,
                   environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` (flags) and ``environ``; a bad value exits with code 2 after
    printing one line that names the setting."""
    try:
        return settings_from(argv, os.environ if environ is None else environ)
    except SettingsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


def log_level_number(level: str) -> int:
    return int(logging.getLevelName(level))


__all__ = ["Settings", "SettingsError", "build_parser", "parse_settings", "settings_from"]
