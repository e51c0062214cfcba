"""Gathered acks: one frame for a run of finished deliveries, never an ack a job did not ask for."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from worker.acks import AckCoalescer
from worker.delivery import Delivery


@dataclass
class RecordingChannel:
    """Stands in for a broker channel: records the frames a coalescer sends, in order."""

    frames: list[tuple[str, int, bool]] = field(default_factory=list)
    is_closed: bool = False

    async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.frames.append(("ack", delivery_tag, multiple))

    async def basic_nack(self, delivery_tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.frames.append(("nack", delivery_tag, multiple))


def _deliveries(channel: RecordingChannel, n: int, acks: AckCoalescer) -> list[Delivery]:
    out = [Delivery(b"{}", {}, None, tag, cast(Any, channel)) for tag in range(1, n + 1)]
    for d in out:
        acks.delivered(d)
    return out


def test_a_run_of_finished_deliveries_is_acked_with_one_frame() -> None:
    async def scenario() -> list[tuple[str, int, bool]]:
        channel, acks = RecordingChannel(), AckCoalescer(flush_after_s=0.001, hold_s=10)
        d = _deliveries(channel, 4, acks)
        later = [asyncio.ensure_future(acks.ack(x)) for x in d[1:3]]  # 2 and 3 finish first
        await asyncio.sleep(0.05)
        assert channel.frames == []  # 1 is still running: nothing may cover it
        assert await acks.ack(d[0])
        assert all(await asyncio.gather(*later))
        return channel.frames

    assert asyncio.run(scenario()) == [("ack", 3, True)]  # 4 was never acked


def test_a_delivery_stuck_behind_a_slow_one_is_acked_alone_after_the_hold() -> None:
    async def scenario() -> list[tuple[str, int, bool]]:
        channel, acks = RecordingChannel(), AckCoalescer(flush_after_s=0.001, hold_s=0.05)
        d = _deliveries(channel, 2, acks)
        assert await asyncio.wait_for(acks.ack(d[1]), timeout=2)
        return channel.frames

    assert asyncio.run(scenario()) == [("ack", 2, False)]


def test_a_multiple_ack_spans_a_nacked_delivery_only_after_its_nack_went_out() -> None:
    async def scenario() -> list[tuple[str, int, bool]]:
        channel, acks = RecordingChannel(), AckCoalescer(flush_after_s=0.001, hold_s=10)
        d = _deliveries(channel, 3, acks)
        first = asyncio.ensure_future(acks.ack(d[0]))
        third = asyncio.ensure_future(acks.ack(d[2]))
        await asyncio.sleep(0.02)
        await d[1].nack()
        acks.settled_otherwise(d[1])
        await asyncio.gather(first, third)
        return channel.frames

    assert asyncio.run(scenario()) == [("ack", 1, False), ("nack", 2, False), ("ack", 3, False)]


def test_a_batch_of_finished_deliveries_is_acked_with_one_frame_and_one_wait() -> None:
    async def scenario() -> tuple[bool, list[tuple[str, int, bool]]]:
        channel, acks = RecordingChannel(), AckCoalescer(flush_after_s=0.001, hold_s=10)
        d = _deliveries(channel, 3, acks)
        return await acks.ack_all(d), channel.frames

    assert asyncio.run(scenario()) == (True, [("ack", 3, True)])


def test_a_batch_split_by_an_unfinished_delivery_is_done_only_once_all_its_acks_went_out() -> None:
    async def scenario() -> tuple[bool, list[tuple[str, int, bool]]]:
        channel, acks = RecordingChannel(), AckCoalescer(flush_after_s=0.001, hold_s=0.05)
        d = _deliveries(channel, 4, acks)
        batch = asyncio.ensure_future(acks.ack_all([d[0], d[2]]))  # 2 is still running
        await asyncio.sleep(0.01)
        assert channel.frames == [("ack", 1, False)]
        assert not batch.done()  # 3 waits behind 2
        return await asyncio.wait_for(batch, timeout=2), channel.frames

    assert asyncio.run(scenario()) == (True, [("ack", 1, False), ("ack", 3, False)])


def test_a_batch_whose_ack_cannot_be_sent_learns_why() -> None:
    @dataclass
    class ClosedChannel(RecordingChannel):
        async def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
            raise ConnectionError("channel closed")

    async def scenario() -> None:
        channel, acks = ClosedChannel(), AckCoalescer(flush_after_s=0.001, hold_s=10)
        await acks.ack_all(_deliveries(channel, 2, acks))

    with pytest.raises(ConnectionError, match="channel closed"):
        asyncio.run(scenario())
