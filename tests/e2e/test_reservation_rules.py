"""The pure part of queue reservations: which devices a queue item names (no queue server)."""

from __future__ import annotations

from bs_coordination.reservations import (
    names_from_device_list,
    names_from_existing_devices,
    reservations_for,
    strings_in,
)

KNOWN = {"det", "det1", "motor", "stage", "stage.coarse", "stage.coarse.x", "stage.coarse.y"}


def _plan(uid: str, name: str, *args: object, **kwargs: object) -> dict[str, object]:
    return {"item_type": "plan", "item_uid": uid, "name": name, "args": list(args),
            "kwargs": kwargs}


def test_strings_in_nested_parameters() -> None:
    assert sorted(strings_in([["det", "det1"], {"a": ("motor", 1)}, 2.0, None])) == [
        "det", "det1", "motor"]


def test_device_trees_of_the_manager_and_of_the_service() -> None:
    tree = {"stage": {"classname": "SampleStage", "components": {
        "coarse": {"components": {"x": {}, "y": {"components": {}}}}}}, "det": {}}
    assert names_from_existing_devices(tree) == {
        "stage", "stage.coarse", "stage.coarse.x", "stage.coarse.y", "det"}
    listed = [{"name": "stage", "components": [{"name": "stage.coarse", "components": [
        {"name": "stage.coarse.x", "components": []}]}]}, {"name": "det"}]
    assert names_from_device_list(listed) == {"stage", "stage.coarse", "stage.coarse.x", "det"}


def test_items_reserve_the_root_devices_of_known_names_in_queue_order() -> None:
    items = [
        _plan("a", "scan", ["det1"], "motor", -1, 1, 5, md={"sample": "det-free text"}),
        _plan("b", "move_then_count", "stage.coarse.x", 1.5, ["det"]),
        _plan("c", "count", ["unknown_det"], num=3),        # names no known device
        {"item_type": "instruction", "item_uid": "d", "name": "queue_stop"},
        _plan("e", "count", detectors=["det"], num=1),
    ]
    wanted = reservations_for(items, KNOWN)
    assert list(wanted) == ["a", "b", "e"]
    assert wanted["a"].devices == {"det1", "motor"}
    assert wanted["b"].devices == {"stage", "det"}  # a component reserves its root
    assert wanted["e"].devices == {"det"}
    assert "scan" in wanted["a"].reason and "move_then_count" in wanted["b"].reason
