"""The EPICS access-security file (ACF) that makes an IOC enforce the lock table.

``render_acf`` writes one ``ASG`` per device, named after the device, whose rules read the
bridge's ``<prefix><device>:LOCK`` PV through ``INPA``:

==========================  =========================================
``:LOCK``                   who may write the device's records
==========================  =========================================
-1 free, 3 QUEUE_QUEUED     operators and queue accounts
1 QUEUE_EXECUTING           queue accounts
2 MANUAL_OPERATOR           operators
0 MAINTENANCE               maintenance staff
INVALID (bridge lost)       maintenance staff
==========================  =========================================

Maintenance staff may always write: their rule has no ``CALC``, so it does not depend on the
bridge (break-glass). Every other rule has a ``CALC``, which EPICS counts as false while
``INPA`` is INVALID or disconnected, so a dead bridge or a lost service fails closed. Reads
are never restricted. Pure text, no I/O::

    print(render_acf({"m1": ["XF:31ID{Mtr:1}"]}, "BL:LOCKS:",
                     Accounts(queue=["queue_server"], operators=["alice"], maintenance=["bob"])))
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bs_coordination.epics.pvnames import check_epics_device_name, check_prefix, lock_pv

#: An EPICS record's ``ASG`` field holds at most 28 characters (DBF_STRING of 29 bytes).
MAX_ASG_NAME = 28

#: ``:LOCK`` values under which each kind of account may write (``CALC`` of its rule).
QUEUE_CALC = "A=-1||A=1||A=3"
OPERATOR_CALC = "A=-1||A=2||A=3"

#: User and host group names in the generated file.
UAG_QUEUE, UAG_OPERATORS, UAG_MAINTENANCE = "bs_queue", "bs_operators", "bs_maintenance"
HAG_QUEUE, HAG_OPERATORS, HAG_MAINTENANCE = "bs_queue_hosts", "bs_operator_hosts", "bs_maintenance_hosts"

# A user or host name is written inside double quotes: no quote, backslash, space or control.
_ACF_NAME_RE = re.compile(r'^[^"\\\s\x00-\x1f\x7f]+$')
# A record name as EPICS allows it (no '.', which starts a field name, no spaces or quotes).
_RECORD_RE = re.compile(r'^[^."\\\s\x00-\x1f\x7f$]+$')


@dataclass(frozen=True)
class Accounts:
    """Channel Access user names per role, and optional host restrictions (``HAG``).

    A role's hosts, when given, restrict that role's rule to clients on those hosts (as the
    IOC sees the client's host name). An empty host list means any host.
    """

    queue: Sequence[str] = ()
    operators: Sequence[str] = ()
    maintenance: Sequence[str] = ()
    queue_hosts: Sequence[str] = ()
    operator_hosts: Sequence[str] = ()
    maintenance_hosts: Sequence[str] = ()

    def check(self) -> None:
        """Raise ``ValueError`` naming the first bad account or host."""
        if not self.maintenance:
            raise ValueError("give at least one --maintenance-user: maintenance staff are the only "
                             "accounts that can write while the bridge is down (break-glass)")
        for what, names in (("--queue-user", self.queue), ("--operator-user", self.operators),
                            ("--maintenance-user", self.maintenance),
                            ("--queue-host", self.queue_hosts),
                            ("--operator-host", self.operator_hosts),
                            ("--maintenance-host", self.maintenance_hosts)):
            for name in names:
                if not _ACF_NAME_RE.match(name):
                    raise ValueError(f"{what} {name!r}: a name must not be empty or contain "
                                     "quotes, backslashes, spaces or control characters")
        if self.queue_hosts and not self.queue:
            raise ValueError("--queue-host needs at least one --queue-user")
        if self.operator_hosts and not self.operators:
            raise ValueError("--operator-host needs at least one --operator-user")


def check_record_name(name: str) -> str:
    """Return the record part of a PV name (``REC.VAL`` -> ``REC``); ``ValueError`` if invalid."""
    record = name.split(".", 1)[0]
    if not record or not _RECORD_RE.match(record):
        raise ValueError(f"invalid EPICS record name {name!r}")
    return record


def check_devices(devices: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Validate device and record names; each record in exactly one device.

    Returns ``{device: [record, ...]}`` with records reduced to record names (no field) and
    without duplicates, in the order given. Raises ``ValueError`` naming the problem.
    """
    if not devices:
        raise ValueError("no devices: give --device NAME=RECORD[,RECORD], or a service "
                         "(--url) that discovered devices with EPICS PV names")
    owner: dict[str, str] = {}
    result: dict[str, list[str]] = {}
    for device, records in devices.items():
        check_epics_device_name(device)
        if len(device) > MAX_ASG_NAME:
            raise ValueError(f"device name {device!r} is longer than {MAX_ASG_NAME} characters, "
                             "the most an EPICS record's ASG field holds")
        if device == "DEFAULT":
            raise ValueError("a device must not be named DEFAULT (the IOC's default access group)")
        names: list[str] = []
        for pv in records:
            record = check_record_name(pv)
            if record in owner and owner[record] != device:
                raise ValueError(f"record {record!r} belongs to both {owner[record]!r} and "
                                 f"{device!r}; a record has one access-security group")
            owner[record] = device
            if record not in names:
                names.append(record)
        result[device] = names
    return result


def records_from_discovery(devices: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """``{device: [record, ...]}`` from the service's device list (``/api/device-config/devices``).

    A device's records are those of the PVs written by it and its components (``write_pv``):
    the records a lock protects. Read-only PVs (readbacks, often shared between devices) are
    left in their current group. Devices without any EPICS write PV are left out.
    """
    result: dict[str, list[str]] = {}
    for device in devices:
        name = str(device.get("name", ""))
        pvs = list(_write_pvs(device))
        if name and pvs:
            result[name] = pvs
    return result


def _write_pvs(node: Mapping[str, Any]) -> Iterable[str]:
    pv = node.get("write_pv")
    if isinstance(pv, str) and pv:
        yield pv
    for child in node.get("components") or []:
        if isinstance(child, Mapping):
            yield from _write_pvs(child)


def render_acf(devices: Mapping[str, Sequence[str]], prefix: str, accounts: Accounts,
               *, source: str = "bs-coordination epics-acf") -> str:
    """The access-security file for ``devices`` (``{device: [record, ...]}``).

    Raises ``ValueError`` for a bad device, record, account or host name (nothing is written).
    """
    accounts.check()
    check_prefix(prefix)
    checked = check_devices(devices)
    lines = [
        f"# EPICS access security for coordinated devices, written by `{source}`.",
        f"# Each device's group reads its lock PV {lock_pv(prefix, '<device>')}, served by",
        "# `bs-coordination epics-bridge`: -1 free, 0 MAINTENANCE, 1 QUEUE_EXECUTING,",
        "# 2 MANUAL_OPERATOR, 3 QUEUE_QUEUED; INVALID or disconnected: every CALC rule is false.",
        "# Load with asSetFilename(\"<this file>\") before iocInit (then asInit if access security",
        "# is not active yet); reload with asInit after editing.",
        "#",
        "# Assign each record to its device's group (field ASG):",
    ]
    for device, records in checked.items():
        for record in records:
            lines.append(f'#   record {record}: field(ASG, "{device}")')
    if not any(checked.values()):
        lines.append("#   (no records given: set the ASG field of each device's records)")
    lines.append("")
    lines += _groups(accounts)
    lines += [
        "",
        "# Records without an ASG field: unrestricted, as without access security.",
        "ASG(DEFAULT) {",
        "    RULE(1, READ)",
        "    RULE(1, WRITE)",
        "}",
    ]
    for device, records in checked.items():
        lines += ["", *_device_group(device, records, prefix, accounts)]
    return "\n".join(lines) + "\n"


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _groups(accounts: Accounts) -> list[str]:
    lines = []
    for uag, users in ((UAG_QUEUE, accounts.queue), (UAG_OPERATORS, accounts.operators),
                       (UAG_MAINTENANCE, accounts.maintenance)):
        if users:
            lines.append(f"UAG({uag}) {{ {_quoted(users)} }}")
    for hag, hosts in ((HAG_QUEUE, accounts.queue_hosts), (HAG_OPERATORS, accounts.operator_hosts),
                       (HAG_MAINTENANCE, accounts.maintenance_hosts)):
        if hosts:
            lines.append(f"HAG({hag}) {{ {_quoted(hosts)} }}")
    return lines


def _device_group(device: str, records: Sequence[str], prefix: str,
                  accounts: Accounts) -> list[str]:
    def rule(uag: str, hag: str | None, calc: str | None, comment: str) -> str:
        parts = [f"UAG({uag})"]
        if hag:
            parts.append(f"HAG({hag})")
        if calc:
            parts.append(f'CALC("{calc}")')
        return f"    RULE(1, WRITE) {{ {' '.join(parts)} }}  # {comment}"

    head = f"# {device}: records {', '.join(records)}" if records else f"# {device}"
    lines = [head, f"ASG({device}) {{", f'    INPA("{lock_pv(prefix, device)}")',
             "    RULE(1, READ)"]
    lines.append(rule(UAG_MAINTENANCE, HAG_MAINTENANCE if accounts.maintenance_hosts else None,
                      None, "maintenance staff: always (break-glass, no CALC)"))
    if accounts.queue:
        lines.append(rule(UAG_QUEUE, HAG_QUEUE if accounts.queue_hosts else None, QUEUE_CALC,
                          "queue: free, QUEUE_EXECUTING, QUEUE_QUEUED"))
    if accounts.operators:
        lines.append(rule(UAG_OPERATORS, HAG_OPERATORS if accounts.operator_hosts else None,
                          OPERATOR_CALC, "operators: free, MANUAL_OPERATOR, QUEUE_QUEUED"))
    lines.append("}")
    return lines


__all__ = [
    "MAX_ASG_NAME",
    "OPERATOR_CALC",
    "QUEUE_CALC",
    "Accounts",
    "check_devices",
    "check_record_name",
    "records_from_discovery",
    "render_acf",
]
