"""``redis_url``: the store URL forms, read without connecting; a bad URL names the problem
and never shows the password."""

from __future__ import annotations

import pytest

from bs_coordination.stores import open_store
from bs_coordination.stores.redis import RedisStore
from bs_coordination.stores.redis_url import parse


def test_a_sentinel_url() -> None:
    t = parse("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2,[::1]:26380/locks/3")
    assert t.password == "s3cret"
    assert t.where == "Sentinel 10.0.0.1:26379,10.0.0.2:26379,::1:26380 service 'locks'"
    assert (t.wait_replicas, t.wait_timeout_ms) == (1, 500)  # WAIT 1 by default with Sentinel


def test_wait_is_an_option_of_every_form() -> None:
    assert parse("redis://h:1/0").wait_replicas == 0
    t = parse("redis://:pw@h:1/0?wait_replicas=2&wait_timeout=250")
    assert (t.wait_replicas, t.wait_timeout_ms, t.where) == (2, 250, "h:1")
    assert parse("redis+sentinel://h:1/locks?wait_replicas=0").wait_replicas == 0


@pytest.mark.parametrize(("url", "problem"), [
    ("redis+sentinel://:pw-x@h:1", "SERVICE_NAME"),
    ("redis+sentinel://:pw-x@h:1/locks/zero", "database"),
    ("redis+sentinel://:pw-x@h:port/locks", "port"),
    ("redis+sentinel://:pw-x@h:1/locks?wait_replicas=-1", "wait_replicas"),
    ("redis://:pw-x@h:1/0?wait_timeout=soon", "wait_timeout"),
    ("mongodb://:pw-x@h:1/0", "scheme"),
])
def test_a_bad_url_names_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as refused:
        parse(url)
    assert "pw-x" not in str(refused.value)


async def test_open_store_accepts_sentinel() -> None:
    store = open_store("redis+sentinel://127.0.0.1:1,127.0.0.1:2/locks")
    try:
        assert isinstance(store, RedisStore) and "service 'locks'" in store.where
    finally:
        await store.close()


async def test_no_sentinel_answers_fails_closed() -> None:
    import socket

    from bs_coordination.errors import StoreUnavailableError
    from bs_coordination.models import LockRequest, LockType

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = RedisStore(f"redis+sentinel://:pw-y@127.0.0.1:{port}/locks")
    try:
        with pytest.raises(StoreUnavailableError, match="lock store unavailable") as refused:
            await store.request(LockRequest(device_name="det1", lock_type=LockType.MAINTENANCE,
                                            user_id="staff"))
        assert "pw-y" not in refused.value.message and f"127.0.0.1:{port}" in refused.value.message
    finally:
        await store.close()
