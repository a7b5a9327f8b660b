"""API keys: the key file, principals and roles (no web framework here, so that the
``bs-coordination keys`` command can use it too).

The service's ``--api-keys`` file is JSON or YAML and holds only the SHA-256 of each key::

    {"api_keys": [{"principal": "alice", "roles": ["operator"], "key_sha256": "<64 hex>"}]}

``bs-coordination keys new --principal alice --role operator`` makes a key and prints the
entry. The service enforces the roles (``bs_coordination.service.auth``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from bs_coordination.models import MAX_NAME_LENGTH

#: Longest key worth hashing; anything longer is not one of ours.
MAX_KEY_LENGTH = 512

_PRINCIPAL_RE = re.compile(r"^[A-Za-z0-9_.@:+\-]+$")
PRINCIPAL_RULE = (f"1 to {MAX_NAME_LENGTH} characters of letters, digits and '_', '.', '@', ':', "
                  "'+', '-'")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


class Role(str, Enum):
    """What a key may do; ``admin`` includes every other role, every key can ``read``."""

    READ = "read"
    OPERATOR = "operator"
    QUEUE = "queue"
    ADMIN = "admin"


@dataclass(frozen=True)
class Principal:
    """Who a key belongs to, and its roles."""

    name: str
    roles: frozenset[Role]

    def can(self, role: Role) -> bool:
        return role is Role.READ or role in self.roles or Role.ADMIN in self.roles

    @property
    def is_admin(self) -> bool:
        return Role.ADMIN in self.roles

    def describe_roles(self) -> str:
        return ", ".join(sorted(r.value for r in self.roles))


def hash_api_key(key: str) -> str:
    """The stored form of an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    """A fresh API key (256 random bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def key_entry(principal: str, roles: Iterable[str], key: str) -> dict[str, Any]:
    """The key file entry for ``key`` (which it does not contain, only its hash)."""
    return {"principal": principal, "roles": list(roles), "key_sha256": hash_api_key(key)}


class KeyFileError(ValueError):
    """The API-key file cannot be used; the message says where and why, in one line."""


def check_principal(name: object) -> str:
    """``name`` if it is a valid principal name, else ``KeyFileError`` saying the rule."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH \
            or not _PRINCIPAL_RE.match(name):
        shown = repr(name)[:60]
        raise KeyFileError(f"principal {shown} is not a valid name: {PRINCIPAL_RULE}")
    return name


def parse_roles(raw: object) -> frozenset[Role]:
    """A non-empty list of role names (or one name) as ``Role``s, else ``KeyFileError``."""
    allowed = ", ".join(r.value for r in Role)
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise KeyFileError(f"roles must be a non-empty list of: {allowed}")
    roles = set()
    for r in raw:
        try:
            roles.add(Role(r))
        except ValueError:
            raise KeyFileError(f"unknown role {str(r)[:40]!r}; roles are: {allowed}") from None
    return frozenset(roles)


@dataclass(frozen=True)
class _Entry:
    key_sha256: str
    principal: Principal


class KeyRing:
    """The API keys the service accepts, by the SHA-256 of each key."""

    def __init__(self, entries: Iterable[Mapping[str, Any]]) -> None:
        self._by_hash: dict[str, _Entry] = {}
        for i, raw in enumerate(entries, start=1):
            try:
                entry = self._entry(raw)
            except KeyFileError as exc:
                raise KeyFileError(f"api_keys entry {i}: {exc}") from None
            if entry.key_sha256 in self._by_hash:
                other = self._by_hash[entry.key_sha256].principal.name
                raise KeyFileError(f"api_keys entry {i}: the same key_sha256 as the entry of "
                                   f"{other!r}; every key must be different")
            self._by_hash[entry.key_sha256] = entry

    @staticmethod
    def _entry(raw: Mapping[str, Any]) -> _Entry:
        if not isinstance(raw, Mapping):
            raise KeyFileError("must be a mapping with principal, roles and key_sha256")
        if "key" in raw or "api_key" in raw:
            raise KeyFileError("holds a key in clear text; store only its key_sha256")
        unknown = set(raw) - {"principal", "roles", "key_sha256"}
        if unknown:
            raise KeyFileError(f"unknown field {sorted(map(str, unknown))[0]!r} (fields are "
                               "principal, roles, key_sha256)")
        name = check_principal(raw.get("principal"))
        roles = parse_roles(raw.get("roles"))
        digest = raw.get("key_sha256")
        if not isinstance(digest, str) or not _SHA256_RE.match(digest):
            raise KeyFileError("key_sha256 must be 64 hex digits, the SHA-256 of the key "
                               "('bs-coordination keys new' prints one)")
        return _Entry(digest.lower(), Principal(name, roles))

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """Load a JSON or YAML key file; ``KeyFileError`` says what is wrong with it."""
        p = Path(path)
        try:
            text = p.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"{p}: cannot read: {exc}") from None
        json_file = p.suffix.lower() == ".json"
        try:
            data = json.loads(text) if json_file else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KeyFileError(f"{p}: not valid {'JSON' if json_file else 'YAML'}: {first}") from None
        if not isinstance(data, Mapping) or not isinstance(data.get("api_keys"), list):
            raise KeyFileError(f'{p}: must be a mapping {{"api_keys": [...]}}')
        try:
            return cls(data["api_keys"])
        except KeyFileError as exc:
            raise KeyFileError(f"{p}: {exc}") from None

    @property
    def principals(self) -> list[Principal]:
        return [e.principal for e in self._by_hash.values()]

    def find(self, key: str) -> Principal | None:
        """The principal of ``key``, or ``None``. The dict finds the candidate by hash (which
        reveals nothing about the key); the final comparison is constant-time all the same."""
        digest = hash_api_key(key) if len(key) <= MAX_KEY_LENGTH else ""
        entry = self._by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry.key_sha256, digest):
            return None
        return entry.principal


__all__ = [
    "KeyFileError",
    "KeyRing",
    "Principal",
    "Role",
    "check_principal",
    "hash_api_key",
    "key_entry",
    "new_api_key",
    "parse_roles",
]
