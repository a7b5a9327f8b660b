"""``bs-coordination epics-acf``: the file it writes, its refusals, and a real IOC loading it."""

from __future__ import annotations

import re

import pytest
from ca_parts import wait_until

from bs_coordination.cli import main
from bs_coordination.epics.acf import Accounts, records_from_discovery, render_acf

pytestmark = pytest.mark.epics

ACCOUNTS = Accounts(queue=["queue_server"], operators=["alice", "carol"], maintenance=["bob"])


def group(text: str, name: str) -> str:
    match = re.search(r"^ASG\(" + re.escape(name) + r"\) \{\n(.*?)^\}", text, re.M | re.S)
    assert match, f"no ASG({name}) in:\n{text}"
    return match.group(1)


def test_one_group_per_device_named_after_it_with_the_rules_of_the_issue():
    text = render_acf({"m1": ["XF:31ID{Mtr:1}.VAL", "XF:31ID{Mtr:1}"], "det1": ["XF:DET1:Acquire"]},
                      "BL:LOCKS:", ACCOUNTS)
    assert re.findall(r"^ASG\((\w+)\)", text, re.M) == ["DEFAULT", "m1", "det1"]
    m1 = group(text, "m1")
    assert 'INPA("BL:LOCKS:m1:LOCK")' in m1
    assert "RULE(1, READ)\n" in m1  # reads never restricted
    rules = re.findall(r"RULE\(1, WRITE\) \{ (.*?) \}", m1)
    assert rules == ["UAG(bs_maintenance)",  # break-glass: no CALC
                     'UAG(bs_queue) CALC("A=-1||A=1||A=3")',
                     'UAG(bs_operators) CALC("A=-1||A=2||A=3")']
    assert 'UAG(bs_queue) { "queue_server" }' in text
    assert 'UAG(bs_operators) { "alice", "carol" }' in text
    assert 'UAG(bs_maintenance) { "bob" }' in text
    assert "HAG(" not in text
    # One assignment comment per record (the field part of a PV name dropped, once).
    assert re.findall(r"^#   record (\S+): field\(ASG, \"(\w+)\"\)$", text, re.M) == [
        ("XF:31ID{Mtr:1}", "m1"), ("XF:DET1:Acquire", "det1")]


def test_host_groups_restrict_their_role_only():
    accounts = Accounts(queue=["queue_server"], operators=["alice"], maintenance=["bob"],
                        queue_hosts=["qhost"], maintenance_hosts=["console1", "console2"])
    text = render_acf({"m1": ["TST:m1"]}, "P:", accounts)
    assert 'HAG(bs_queue_hosts) { "qhost" }' in text
    assert 'HAG(bs_maintenance_hosts) { "console1", "console2" }' in text
    m1 = group(text, "m1")
    assert "UAG(bs_maintenance) HAG(bs_maintenance_hosts) }" in m1
    assert 'UAG(bs_queue) HAG(bs_queue_hosts) CALC("A=-1||A=1||A=3")' in m1
    assert 'UAG(bs_operators) CALC("A=-1||A=2||A=3")' in m1


@pytest.mark.parametrize(("devices", "accounts", "error"), [
    ({"m1": ["R1"]}, Accounts(queue=["q"], operators=["a"]), "at least one --maintenance-user"),
    ({"m1": ["R1"]}, Accounts(maintenance=['b"ob']), "--maintenance-user 'b\"ob'"),
    ({"m1": ["R1"]}, Accounts(maintenance=["bob"], operators=["al ice"]), "--operator-user"),
    ({"m1": ["R1"]}, Accounts(maintenance=["bob"], queue_hosts=["h"]), "--queue-host needs"),
    ({"m1": ["R1"], "m2": ["R1.VAL"]}, ACCOUNTS, "record 'R1' belongs to both 'm1' and 'm2'"),
    ({"m1.user_setpoint": ["R1"]}, ACCOUNTS, "component"),
    ({"x" * 29: ["R1"]}, ACCOUNTS, "longer than 28 characters"),
    ({"DEFAULT": ["R1"]}, ACCOUNTS, "DEFAULT"),
    ({"m1": ['R"1']}, ACCOUNTS, "invalid EPICS record name"),
    ({}, ACCOUNTS, "no devices"),
    ({"m1": ["R1"]}, ACCOUNTS, "--prefix 'BL LOCKS:'"),
])
def test_bad_input_is_refused_with_a_clear_error(devices, accounts, error):
    prefix = "BL LOCKS:" if "--prefix" in error else "P:"
    with pytest.raises(ValueError, match=re.escape(error)):
        render_acf(devices, prefix, accounts)


def test_records_from_the_service_device_list():
    devices = [
        {"name": "m1", "write_pv": None, "components": [
            {"name": "m1.user_setpoint", "read_pv": "XF:31ID{Mtr:1}.VAL",
             "write_pv": "XF:31ID{Mtr:1}.VAL", "components": []},
            {"name": "m1.user_readback", "read_pv": "XF:31ID{Mtr:1}.RBV", "write_pv": None},
            {"name": "m1.motor_stop", "read_pv": None, "write_pv": "XF:31ID{Mtr:1}.STOP"}]},
        {"name": "shutter", "components": [
            {"name": "shutter.status", "read_pv": "XF:Sh:Pos-Sts", "write_pv": None},
            {"name": "shutter.cmd", "read_pv": "XF:Sh:Cmd", "write_pv": "XF:Sh:Cmd-SP"}]},
        {"name": "det", "device_class": "SynGauss", "components": []},  # ophyd.sim: no PVs
    ]
    found = records_from_discovery(devices)
    assert found == {"m1": ["XF:31ID{Mtr:1}.VAL", "XF:31ID{Mtr:1}.STOP"],
                     "shutter": ["XF:Sh:Cmd-SP"]}
    text = render_acf(found, "P:", ACCOUNTS)
    assert re.findall(r"^#   record (\S+): field\(ASG, \"(\w+)\"\)$", text, re.M) == [
        ("XF:31ID{Mtr:1}", "m1"), ("XF:Sh:Cmd-SP", "shutter")]


def test_cli_writes_the_file_and_refuses_bad_input_without_writing(tmp_path, capsys):
    out = tmp_path / "coordination.acf"
    args = ["epics-acf", "--prefix", "BL:", "--device", "m1=TST:m1,TST:m1b",
            "--queue-user", "queue_server", "--operator-user", "alice",
            "--maintenance-user", "bob", "--queue-host", "qhost"]
    assert main([*args, "--output", str(out)]) == 0
    assert out.read_text() == render_acf(
        {"m1": ["TST:m1", "TST:m1b"]}, "BL:",
        Accounts(queue=["queue_server"], operators=["alice"], maintenance=["bob"],
                 queue_hosts=["qhost"]))
    assert main(args) == 0
    assert capsys.readouterr().out == out.read_text()
    bad = tmp_path / "bad.acf"
    for wrong, error in (("m1", "expected NAME=RECORD"), ("m1=", "expected NAME=RECORD"),
                         ("m1.cam=R1", "component")):
        argv = ["epics-acf", "--device", wrong, "--maintenance-user", "bob", "--output", str(bad)]
        assert main(argv) == 64
        assert error in capsys.readouterr().err
        assert not bad.exists()
    assert main(["epics-acf", "--device", "m1=R1", "--queue-user", "q", "--output", str(bad)]) == 64
    assert "--maintenance-user" in capsys.readouterr().err
    assert not bad.exists()


def test_a_real_ioc_loads_the_file_and_applies_host_groups(live_service, ioc_factory,
                                                           bridge_factory, ca_users):
    """The generated file (host groups, comments, several devices) loads into a real IOC; a
    queue account on another host than --queue-host is refused while one on it writes."""
    accounts = Accounts(queue=["queue_server"], operators=["alice"], maintenance=["bob"],
                        queue_hosts=["qhost"])
    text = render_acf({"m1": ["TST:m1"], "m2": ["TST:m2"]}, "HAG:", accounts)
    ioc_factory(text, {"TST:m1": "m1", "TST:m2": "m2", "TST:free": ""})
    bridge_factory(live_service.url, "HAG:", ["m1", "m2"])
    on_host = ca_users("queue_server", host="qhost")
    elsewhere = ca_users("queue_server", host="otherhost")
    alice = ca_users("alice")
    wait_until(lambda: on_host.can_write("TST:m1"), 15, "queue_server on qhost writes free m1")
    assert on_host.write("TST:m1", 1.0) == 1.0
    assert not elsewhere.can_write("TST:m1")
    assert elsewhere.write("TST:m1", 2.0) == 1.0
    # A record outside every device group keeps the IOC's default: anyone writes.
    assert elsewhere.write("TST:free", 3.0) == 3.0
    assert alice.write("TST:m2", 4.0) == 4.0
