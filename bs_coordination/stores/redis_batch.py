"""The Redis store's script calls, batched: every call made during one event-loop iteration goes
to Redis in one redis-py pipeline (one connection, one write, the replies read in order), so
50 concurrent requests cost a few network round trips instead of 50.

A pipeline sends ``EVALSHA`` for each call; a ``NOSCRIPT`` reply (a restarted or promoted
Redis forgot the script, and ran nothing) makes the batch load it (``SCRIPT LOAD``, through
the script object redis-py registered) and send those calls again. With ``wait_replicas`` the
pipeline ends with one ``WAIT``: it counts the replicas that received every write of that
connection, so of every call of the batch.

A pipeline that fails as a whole (connection lost, timeout, a demoted primary's ``READONLY``
through Sentinel) fails every call of the batch with that error: whether each ran is unknown.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.exceptions import NoScriptError

#: What a call is answered with: the script's reply, and how many replicas confirmed the
#: batch's writes (``None`` when ``WAIT`` was not asked for; -1 when it failed).
Answer = tuple[Any, int | None]


class Batcher:
    """Runs ``script`` (a redis-py ``AsyncScript``) through pipelines of ``client``."""

    def __init__(self, client: Any, script: Any, wait_replicas: int, wait_timeout_ms: int) -> None:
        self._client = client
        self._script = script
        self._wait = (wait_replicas, wait_timeout_ms) if wait_replicas else None
        self._queue: list[tuple[list[bytes], list[bytes], asyncio.Future[Answer]]] = []
        self._running: set[asyncio.Task[None]] = set()

    def call(self, keys: list[bytes], args: list[bytes]) -> asyncio.Future[Answer]:
        """Queue one script call; it goes out with the others queued in this iteration."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Answer] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((keys, args, fut))
        return fut

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[list[bytes], list[bytes], asyncio.Future[Answer]]]
                   ) -> None:
        pending = batch
        try:
            for _ in range(2):
                results = await self._send(pending)
                acked: int | None = None
                if self._wait is not None:
                    last = results.pop()
                    acked = -1 if isinstance(last, Exception) else int(last)
                again = []
                for call, result in zip(pending, results, strict=True):
                    fut = call[2]
                    if isinstance(result, NoScriptError):
                        again.append(call)
                    elif fut.done():
                        continue  # its caller went away
                    elif isinstance(result, Exception):
                        fut.set_exception(result)
                    else:
                        fut.set_result((result, acked))
                if not again:
                    return
                self._script.sha = await self._client.script_load(self._script.script)
                pending = again
            raise NoScriptError("Redis does not keep the script loaded")
        except Exception as exc:
            for _, _, fut in pending:
                if not fut.done():
                    fut.set_exception(exc)
        except BaseException:  # cancelled (the store closes): nobody may wait for ever
            for _, _, fut in pending:
                fut.cancel()
            raise

    async def _send(self, calls: list[tuple[list[bytes], list[bytes], asyncio.Future[Answer]]]
                    ) -> list[Any]:
        sha = self._script.sha
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args, _ in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            if self._wait is not None:
                pipe.execute_command("WAIT", *self._wait)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def close(self) -> None:
        """Stop the batches in flight (their callers are told ``CancelledError``)."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
