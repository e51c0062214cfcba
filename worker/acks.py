"""Acknowledging deliveries in as few frames as the broker allows.

A worker settles thousands of jobs a second; one ``basic.ack`` per job costs the broker (and
the worker's event loop) more than the job's own bookkeeping. Jobs of a batch finish together,
so their acks are gathered: once every delivery up to some tag is ready to ack, a single
``basic.ack`` with ``multiple`` set acknowledges all of them.

A delivery is only ever acked after its caller asked for that ack (the job's result is stored
and its event confirmed), never because a later one was: a multiple ack covers a contiguous
run of deliveries that are all ready. A ready delivery held back behind an unfinished earlier
one (a long job, a suspect running in its own process) is acked on its own once it has waited
`hold_s`, so a slow job never pins the prefetch window. Every delivery must be registered
with `delivered` as it arrives, and forgotten with `settled_otherwise` when it is nacked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from worker.delivery import Delivery

FLUSH_AFTER_S = 0.002
HOLD_S = 0.2


class _Waiter:
    """The caller of `AckCoalescer.ack_all`: done once every one of its acks was sent, or
    failed with the first error sending one of them."""

    __slots__ = ("future", "remaining")

    def __init__(self, count: int) -> None:
        self.future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.remaining = count

    def sent(self, error: BaseException | None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
            return
        self.remaining -= 1
        if self.remaining <= 0:
            self.future.set_result(True)


class _ChannelAcks:
    """Deliveries of one channel (delivery tags are per channel), in arrival order."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.outstanding: dict[int, None] = {}  # delivery tags; insertion order = tag order
        self.ready: dict[int, tuple[float, _Waiter]] = {}


class AckCoalescer:
    """Gathers acks of one consumer into ``basic.ack(multiple=True)`` frames."""

    def __init__(self, flush_after_s: float = FLUSH_AFTER_S, hold_s: float = HOLD_S) -> None:
        self._flush_after_s = flush_after_s
        self._hold_s = hold_s
        self._channels: dict[int, _ChannelAcks] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one flush at a time: each walks and edits the same runs
        self.frames = 0  # ack frames sent: the saving is deliveries acked / frames

    def _acks_of(self, message: Delivery) -> _ChannelAcks:
        channel = message.channel
        acks = self._channels.get(id(channel))
        if acks is None or acks.channel is not channel:
            acks = self._channels[id(channel)] = _ChannelAcks(channel)
        return acks

    def delivered(self, message: Delivery) -> None:
        """Register a delivery as it arrives (before anything can settle it)."""
        if message.delivery_tag is not None:
            self._acks_of(message).outstanding[message.delivery_tag] = None

    def settled_otherwise(self, message: Delivery) -> None:
        """The delivery was nacked or rejected: no ack may cover it."""
        if message.delivery_tag is not None:
            acks = self._acks_of(message)
            acks.outstanding.pop(message.delivery_tag, None)
            waiting = acks.ready.pop(message.delivery_tag, None)
            if waiting is not None:  # asked to be acked, then nacked: its caller learns it was not
                waiting[1].sent(RuntimeError(f"delivery {message.delivery_tag} was settled otherwise"))
            if acks.ready:  # deliveries held behind this one may go now
                self._schedule(self._flush_after_s)

    async def ack(self, message: Delivery) -> bool:
        """Ack `message` soon, with others where possible; True once the ack frame was sent."""
        return await self.ack_all((message,))

    async def ack_all(self, messages: Sequence[Delivery]) -> bool:
        """Ack every one of `messages` soon, with others where possible; True once every ack
        frame was sent (one wait for all of them: the jobs of a batch are acked together)."""
        registered: list[tuple[_ChannelAcks, int]] = []
        for message in messages:
            tag = message.delivery_tag
            acks = self._acks_of(message)
            if tag is None or tag not in acks.outstanding:  # not registered: ack it on its own
                await message.ack()
                self.frames += 1
            else:
                registered.append((acks, tag))
        if not registered:
            return True
        waiter = _Waiter(len(registered))
        now = time.monotonic()
        for acks, tag in registered:
            acks.ready[tag] = (now, waiter)
        self._schedule(self._flush_after_s)
        return await waiter.future

    def _schedule(self, delay: float) -> None:
        """Flush in `delay` seconds, or sooner if a flush is due sooner already."""
        loop = asyncio.get_running_loop()
        if self._flush is not None:
            if self._flush.when() <= loop.time() + delay:
                return
            self._flush.cancel()
        self._flush = loop.call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        task = asyncio.ensure_future(self._send_ready())
        self._flushing.add(task)
        task.add_done_callback(self._flushing.discard)

    async def _send_ready(self) -> None:
        async with self._lock:
            try:
                await self._send_ready_locked()
            finally:
                # Whatever happened, deliveries still waiting get another flush.
                if any(acks.ready for acks in self._channels.values()):
                    self._schedule(self._hold_s / 4)

    async def _send_ready_locked(self) -> None:
        now = time.monotonic()
        for key, acks in list(self._channels.items()):
            if not acks.outstanding:
                if getattr(acks.channel, "is_closed", False):
                    del self._channels[key]
                continue
            # The longest run of ready deliveries at the front: one frame acks them all.
            run: list[tuple[int, _Waiter]] = []
            for tag in acks.outstanding:
                if tag not in acks.ready:
                    break
                run.append((tag, acks.ready[tag][1]))
            for tag, _ in run:
                del acks.outstanding[tag], acks.ready[tag]
            if run:
                await self._send(acks, run[-1][0], run, multiple=len(run) > 1)
            # Ready deliveries stuck behind an unfinished one go alone once they waited too long
            # (the list is read again after each send: a nack may have settled one meanwhile).
            while True:
                stale = next((t for t, (since, _) in acks.ready.items() if now - since >= self._hold_s), None)
                if stale is None:
                    break
                acks.outstanding.pop(stale, None)
                _, waiter = acks.ready.pop(stale)
                await self._send(acks, stale, [(stale, waiter)], multiple=False)

    async def _send(self, acks: _ChannelAcks, tag: int, covered: list[tuple[int, _Waiter]], multiple: bool) -> None:
        error: BaseException | None = None
        try:
            await acks.channel.basic_ack(delivery_tag=tag, multiple=multiple)
            self.frames += 1
        except Exception as exc:  # a closed channel: the broker redelivers these anyway
            error = exc
        for _, waiter in covered:
            waiter.sent(error)
