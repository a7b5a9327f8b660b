"""The rule mapping a device to the name it is locked under (README, "What the plugin changes"):
every named device gets a name the service accepts; unnamed devices get none."""

from __future__ import annotations

from typing import Any

import pytest
from ophyd.sim import SynAxis

from bs_coordination.models import MAX_NAME_LENGTH, check_device_name
from bs_coordination.runengine.plans import lock_name, root_device

from .conftest import Devices


class Bare:
    """Only what bluesky's protocols require: no ``parent``."""

    def __init__(self, name: Any) -> None:
        self.name = name

    def set(self, value: Any) -> None: ...


@pytest.mark.parametrize(("name", "locked_as"), [
    ("motor", "motor"),
    ("XF:31ID-Mtr_1", "XF:31ID-Mtr_1"),
    ("det1.cam", "det1.cam"),              # accepted as it is (a component of 'det1')
    ("sample x", "sample_x"),
    ("  two  spaces ", "_two_spaces_"),
    ("température", "temp_rature"),
    ("a/b\\c", "a_b_c"),
    (".hidden", "_hidden"),                # a dot that would leave an empty component
    ("a..b", "a__b"),
    ("end.", "end_"),
])
def test_named_devices_get_an_accepted_name(name: str, locked_as: str) -> None:
    assert lock_name(Bare(name)) == locked_as
    assert check_device_name(locked_as) == locked_as


def test_a_name_too_long_is_cut_and_keeps_a_hash_of_the_whole() -> None:
    a, b = "x" * 300 + "a", "x" * 300 + "b"
    name_a, name_b = lock_name(Bare(a)), lock_name(Bare(b))
    assert name_a is not None and name_b is not None
    assert len(name_a) == MAX_NAME_LENGTH and check_device_name(name_a) == name_a
    assert name_a != name_b  # the hash tells them apart


@pytest.mark.parametrize("name", ["", None, 3])
def test_unnamed_devices_have_no_lock_name(name: Any) -> None:
    assert lock_name(Bare(name)) is None


def test_the_root_is_found_through_parent_where_there_is_one(devices: Devices) -> None:
    assert lock_name(devices.stage.coarse.x.setpoint) == "stage"
    assert root_device(devices.stage.coarse.x) is devices.stage
    loner = Bare("shutter")
    assert root_device(loner) is loner and lock_name(loner) == "shutter"
    # A component of an unnamed device is not coordinated either (its root has no name).
    unnamed = SynAxis(name="")
    assert lock_name(unnamed.readback) is None
