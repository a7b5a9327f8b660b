"""What only the etcd store does: replicas on one etcd, an outage (503, then healing by
itself), a table that was deleted (reported, tokens never go back), replicas whose clocks
disagree, the event log's trimming, and its URL. The shared store API runs on etcd in
``test_store_api.py``."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import test_differential as differential
from etcd_nodes import EtcdCluster, etcd_cluster
from hypothesis import HealthCheck, given, settings

from bs_coordination import locktable
from bs_coordination.errors import InvalidRequestError, LockConflictError, StoreUnavailableError
from bs_coordination.models import LockRequest, LockType, LockUpdateMessage
from bs_coordination.service.config import SettingsError, settings_from
from bs_coordination.stores import EventGap, ManualClock, MemoryStore, open_store
from bs_coordination.stores.base import event_order
from bs_coordination.stores.etcd import EtcdStore, max_txn_ops, parse_url
from bs_coordination.stores.etcd_client import b64, prefix_end

OP = LockType.MANUAL_OPERATOR
_prefixes = itertools.count()


def ask(name: str | list[str], user: str = "alice", lock_type: LockType = OP, **fields: object) -> LockRequest:
    key = "device_names" if isinstance(name, list) else "device_name"
    return LockRequest.model_validate({key: name, "lock_type": lock_type, "user_id": user, **fields})


@pytest.fixture
async def replicas(etcd_url: str) -> AsyncIterator[list[EtcdStore]]:
    """Two stores on one etcd and one key prefix: two service replicas."""
    stores = [EtcdStore(etcd_url), EtcdStore(etcd_url)]
    for s in stores:
        await s.start()
    yield stores
    for s in stores:
        await s.close()


@pytest.fixture
def own_etcd() -> Iterator[EtcdCluster]:
    """A private single-node etcd of this test's own (it is killed and restarted)."""
    with etcd_cluster(1) as cluster:
        yield cluster


def etcd_values(url: str) -> list[str]:
    """Every value stored under the prefix of ``url`` (read with etcd's own API)."""
    endpoints, prefix = parse_url(url)
    host, port = endpoints[0]
    body = json.dumps({"key": b64(prefix), "range_end": b64(prefix_end(prefix))}).encode()
    with urllib.request.urlopen(f"http://{host}:{port}/v3/kv/range", body, timeout=5) as resp:
        kvs = json.loads(resp.read()).get("kvs", [])
    return [base64.b64decode(kv.get("value", "")).decode() for kv in kvs]


async def test_concurrent_requests_on_two_replicas_grant_each_device_once(replicas) -> None:
    a, b = replicas
    devices = [f"m{i}" for i in range(5)]
    attempts = [store.request(ask(d, user=f"u{i}")) for i, store in enumerate([a, b] * 10)
                for d in devices]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    granted = [o for o in outcomes if not isinstance(o, BaseException)]
    assert all(isinstance(o, LockConflictError) for o in outcomes if isinstance(o, BaseException))
    assert sorted(g.locks[0].device_name for g in granted) == devices
    assert len({g.locks[0].token for g in granted}) == len(devices)
    assert sorted(lock.device_name for lock in await b.all_locks()) == devices


async def test_a_replica_sees_the_locks_of_another_in_order(replicas, eventually) -> None:
    a, b = replicas
    await a.request(ask("z"))  # so that ``since`` is an event, not "from whenever it starts"
    since = await b.last_event_id()
    assert since is not None
    seen: list[LockUpdateMessage] = []

    async def follow() -> None:
        async for msg in b.tail(since):
            seen.append(msg)

    task = asyncio.create_task(follow())
    try:
        first = await a.request(ask("det1"))
        staff = await a.request(ask("det1", "staff", LockType.MAINTENANCE, timeout=None))
        await a.release(staff.lock_key)
        await a.release(first.lock_key)

        async def six() -> bool:
            return len(seen) >= 6
        await eventually(six)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [(m.action.value, m.lock.user_id) for m in seen] == [
        ("acquired", "alice"), ("preempted", "alice"), ("acquired", "staff"),
        ("released", "staff"), ("restored", "alice"), ("released", "alice")]
    orders = [event_order(m.event_id or "") for m in seen]
    assert orders == sorted(orders) and len(set(orders)) == len(orders)
    assert seen == (await b.events_after(since))[:len(seen)]


async def test_lock_keys_are_never_stored(etcd_url: str) -> None:
    store = EtcdStore(etcd_url)
    await store.start()
    try:
        grant = await store.request(ask(["det1", "m1"], reason="alignment"))
        texts = etcd_values(etcd_url)
        assert any("alignment" in t for t in texts)  # the records are there...
        assert not any(grant.lock_key in t for t in texts)  # ...but never the key
        assert any(locktable.hash_key(grant.lock_key) in t for t in texts)
    finally:
        await store.close()


async def test_locks_survive_an_etcd_outage_and_the_store_heals(own_etcd: EtcdCluster) -> None:
    store = EtcdStore(own_etcd.url, timeout=1.0)
    await store.start()
    try:
        grant = await store.request(ask("det1", timeout=600))
        node = own_etcd.nodes[0]
        node.kill()
        with pytest.raises(StoreUnavailableError) as down:
            await store.request(ask("det2"))
        assert "lock store unavailable" in down.value.message and node.endpoint in down.value.message
        with pytest.raises(StoreUnavailableError):
            await store.ping()
        node.start()
        own_etcd.wait_for_leader()
        await store.ping()
        [lock] = await store.all_locks()
        assert lock.device_name == "det1" and lock.token == grant.locks[0].token
        with pytest.raises(LockConflictError):
            await store.request(ask("det1", user="bob"))
        again = await store.request(ask("det2"))
        assert again.locks[0].token > grant.locks[0].token
    finally:
        await store.close()


async def test_a_deleted_table_is_reported_and_tokens_never_go_back(etcd_url: str) -> None:
    store = EtcdStore(etcd_url)
    losses: list[str] = []
    store.add_data_loss_listener(losses.append)
    await store.start()
    try:
        old = await store.request(ask("det1"))
        old_id = await store.last_event_id()
        endpoints, prefix = parse_url(etcd_url)
        host, port = endpoints[0]
        body = json.dumps({"key": b64(prefix + "/"), "range_end": b64(prefix_end(prefix + "/"))}).encode()
        urllib.request.urlopen(f"http://{host}:{port}/v3/kv/deleterange", body, timeout=5).close()

        new = await store.request(ask("det1", user="bob"))  # the old lock is gone with the table
        assert new.locks[0].token > old.locks[0].token
        assert len(losses) == 1 and "lost its data" in losses[0] and store.data_losses == 1
        assert [lock.user_id for lock in await store.all_locks()] == ["bob"]
        assert old_id is not None
        with pytest.raises(EventGap):
            await store.events_after(old_id)
        new_id = await store.last_event_id()
        assert new_id is not None and event_order(new_id) > event_order(old_id)
    finally:
        await store.close()


async def test_a_replica_whose_clock_is_behind_is_refused(etcd_url: str) -> None:
    ahead = EtcdStore(etcd_url)
    behind_clock = ManualClock(start=0)
    behind = EtcdStore(etcd_url, clock=behind_clock)
    await ahead.start()
    await behind.start()
    try:
        await ahead.request(ask("det1"))
        behind_clock.t = (await ahead.now()) - 2.0  # two seconds behind
        with pytest.raises(StoreUnavailableError, match=r"clock is .* behind"):
            await behind.request(ask("det2"))
        behind_clock.t = await ahead.now()  # synchronised again: works
        await behind.request(ask("det2"))
    finally:
        await ahead.close()
        await behind.close()


async def test_the_event_log_is_trimmed_and_an_old_id_is_a_gap(etcd_url: str) -> None:
    store = EtcdStore(etcd_url, event_log_size=20)
    await store.start()
    try:
        await store.request(ask("d"))
        first = await store.last_event_id()
        for i in range(30):
            await store.request(ask(f"m{i}"))
        await store.sweep()
        assert first is not None
        with pytest.raises(EventGap):
            await store.events_after(first)
        last = await store.last_event_id()
        assert last is not None
        recent = await store.events_after(None, limit=5)
        assert [m.event_id for m in recent][-1] == last and len(recent) == 5
    finally:
        await store.close()


def test_urls_and_settings_name_etcd() -> None:
    assert parse_url("etcd://10.0.0.1:2379,10.0.0.2:2380/beamline-7") == (
        [("10.0.0.1", 2379), ("10.0.0.2", 2380)], "beamline-7")
    assert parse_url("etcd://localhost") == ([("localhost", 2379)], "bs-coordination")
    assert isinstance(open_store("etcd://127.0.0.1:1/x"), EtcdStore)
    assert settings_from(["--store", "etcd://127.0.0.1:2379/x"], {}).store == "etcd://127.0.0.1:2379/x"
    with pytest.raises(SettingsError, match=r"--store: .*etcd endpoint 'h:port'"):
        settings_from(["--store", "etcd://h:port"], {})
    with pytest.raises(SettingsError, match="etcd://"):
        settings_from(["--store", "zookeeper://h:1"], {})
    with pytest.raises(ValueError, match="etcd://"):
        open_store("consul://h:1")


async def test_two_hundred_devices_in_one_request_are_all_or_nothing(replicas) -> None:
    """More checks than one etcd transaction takes (128 by default): nested transactions,
    still atomic, and a conflict in a nested level is found."""
    a, b = replicas
    devices = [f"dev{i:03d}" for i in range(200)]
    await b.request(ask("dev150", user="bob"))  # a has never read dev150
    with pytest.raises(LockConflictError) as refused:
        await a.request(ask(devices))
    assert "bob" in refused.value.message
    assert [lock.device_name for lock in await a.all_locks()] == ["dev150"]
    grant = await a.request(ask([d for d in devices if d != "dev150"]))
    assert len(grant.locks) == 199 and len({lock.token for lock in grant.locks}) == 1
    assert len(await b.all_locks()) == 200
    assert len(await a.release(grant.lock_key)) == 199


async def test_a_request_larger_than_one_etcd_transaction_is_refused_whole(etcd_url: str) -> None:
    """With etcd's default --max-txn-ops (128), a request naming 100 devices cannot be one
    transaction: 422 naming the limit and what to do, nothing locked, other requests unaffected."""
    url = etcd_url.partition("?")[0]  # the default limit
    assert max_txn_ops(url) == 128 and max_txn_ops(etcd_url) == 1024
    store = EtcdStore(url)
    await store.start()
    try:
        small = asyncio.ensure_future(store.request(ask("other")))
        with pytest.raises(InvalidRequestError, match="max-txn-ops") as refused:
            await store.request(ask([f"dev{i:03d}" for i in range(100)]))
        assert "lock fewer devices" in refused.value.message
        await small
        assert [lock.device_name for lock in await store.all_locks()] == ["other"]
        grant = await store.request(ask([f"dev{i:03d}" for i in range(40)]))
        assert len(grant.locks) == 40
    finally:
        await store.close()
    with pytest.raises(ValueError, match="max_txn_ops=N"):
        parse_url("etcd://h:1/x?max_txn_ops=lots")


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=differential.operations)
def test_etcd_matches_memory(etcd_server: EtcdCluster, ops) -> None:  # type: ignore[no-untyped-def]
    """Random operation sequences (hierarchy, preemption, upgrades, atomic sets, releases,
    renewals, force releases) give the same outcomes, locks and events on etcd as in memory
    (``test_differential`` has the sequences and the comparison)."""
    url = f"{etcd_server.url}/diff{next(_prefixes)}-{time.time_ns()}"

    async def run() -> None:
        memory = MemoryStore()
        etcd = EtcdStore(url)
        try:
            expected = await differential._apply(memory, ops, [])
            got = await differential._apply(etcd, ops, [])
            assert got == expected
            assert differential._shape(await etcd.all_locks()) == differential._shape(await memory.all_locks())
            for name in differential.NAMES:
                m, e = await memory.device_status(name), await etcd.device_status(name)
                assert (e.locked, differential._shape(e.preempted)) == (m.locked, differential._shape(m.preempted))
            m_events = [(e.device_name, e.action, e.lock.user_id) for e in await memory.events_after(None)]
            e_events = [(e.device_name, e.action, e.lock.user_id) for e in await etcd.events_after(None)]
            for name in differential.NAMES:
                assert [e for e in e_events if e[0] == name] == [e for e in m_events if e[0] == name]
            assert len(e_events) == len(m_events)
        finally:
            await etcd.close()

    asyncio.run(run())


async def test_a_quiet_tail_stays_quiet_and_a_large_commit_comes_whole(
        replicas, eventually, caplog: pytest.LogCaptureFixture) -> None:
    """A tail with nothing to tell for longer than its watch is kept renews the watch without
    a warning; the 200 events of one commit arrive through the watch, in order."""
    a, b = replicas
    await a.request(ask("z"))
    since = await b.last_event_id()
    b.watch_idle = 0.2
    seen: list[LockUpdateMessage] = []

    async def follow() -> None:
        async for msg in b.tail(since):
            seen.append(msg)

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.8)  # quiet: the watch ends and is made again, several times
        devices = [f"dev{i:03d}-{'x' * 150}" for i in range(200)]  # one long watch line
        await a.request(ask(devices, reason="y" * 200))

        async def all_there() -> bool:
            return len(seen) >= 200
        await eventually(all_there)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert sorted(m.device_name for m in seen) == devices
    assert [m.event_id for m in seen] == [m.event_id for m in await b.events_after(since)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_many_leases_running_out_at_once_all_expire(etcd_url: str) -> None:
    """More expired locks than one etcd transaction can remove (default --max-txn-ops): the
    sweep removes them all, each with its event."""
    clock = ManualClock(start=time.time())
    store = EtcdStore(etcd_url.partition("?")[0], clock=clock)
    await store.start()
    try:
        for i in range(60):
            await store.request(ask(f"m{i}", timeout=1))
        clock.advance(2)
        assert await store.all_locks() == []  # never reported after the lease ended...
        assert await store.sweep() == 60  # ...and swept, every one
        events = await store.events_after(None, limit=1000)
        assert sum(e.action.value == "expired" for e in events) == 60
        assert await store.sweep() == 0
    finally:
        await store.close()
