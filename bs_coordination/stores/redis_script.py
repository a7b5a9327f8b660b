"""The Redis store's wire: one Lua script, ``APPLY``, that runs a list of plain commands as one
command, and a plain RESP encoder.

It holds no lock logic (that stays in ``locktable``, the one copy every store runs). It only
turns the dozen reads of a fetch round, or the dozen writes of a commit, into one command with
one reply: redis-py's per-command packing and per-reply parsing cost more than Redis itself.
A script runs atomically, so a read-only round is also one consistent snapshot. Inside
``MULTI``/``EXEC`` it obeys ``WATCH`` like any command.
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis.exceptions import NoScriptError

#: KEYS: every key the commands use.
#: ARGV: per command: its name, the index of its key in KEYS (0: none), the number n of
#:       further arguments, then those n arguments.
#: Returns: the replies of the commands, in order (an error stops the script there).
APPLY = """
local out = {}
local i = 1
while i <= #ARGV do
  local cmd = {ARGV[i]}
  local key = tonumber(ARGV[i + 1])
  if key > 0 then cmd[2] = KEYS[key] end
  local n = tonumber(ARGV[i + 2])
  for j = 1, n do cmd[#cmd + 1] = ARGV[i + 2 + j] end
  out[#out + 1] = redis.call(unpack(cmd))
  i = i + 3 + n
end
return out
"""

APPLY_SHA = hashlib.sha1(APPLY.encode()).hexdigest()


class ScriptCall:
    """Collects commands for one ``EVALSHA`` of ``APPLY``."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._index: dict[str, int] = {}
        self.argv: list[Any] = []
        self.count = 0

    def add(self, name: str, key: str | None = None, *args: Any) -> int:
        """Add a command; returns its position in the script's reply."""
        index = 0
        if key is not None:
            index = self._index.get(key, 0)
            if not index:
                self.keys.append(key)
                index = self._index[key] = len(self.keys)
        self.argv += [name, index, len(args), *args]
        self.count += 1
        return self.count - 1

    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", APPLY_SHA, len(self.keys), *self.keys, *self.argv)


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP encoding of ``commands`` (``str``, ``bytes``, ``int``; floats must come as text).

    Plain and much cheaper than redis-py's general encoder, which showed up first in profiles.
    """
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for arg in cmd:
            if isinstance(arg, int):
                data = b"%d" % arg
            else:
                data = arg.encode() if isinstance(arg, str) else arg
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def is_noscript(value: object) -> bool:
    """The server does not have the script (a restart empties its script cache)."""
    return isinstance(value, NoScriptError) or (
        isinstance(value, Exception) and str(value).startswith("NOSCRIPT"))
