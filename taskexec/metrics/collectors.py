"""What is read at scrape time: each queue's backlog in the broker's lists, and the workers
whose heartbeats arrive."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import Redis, RedisError

__all__ = ["QueueBacklog", "WorkersOnline", "priority_lists"]

log = logging.getLogger(__name__)


def priority_lists(queue: str, transport_options: Mapping[str, Any]) -> list[str]:
    """The Redis lists kombu keeps for ``queue``: one per priority step (``executor:4``).

    Mirrors ``kombu.transport.redis.Channel._q_for_pri``: step 0 is the queue's own name.
    """
    sep = str(transport_options.get("sep", "\x06\x16"))
    steps = list(transport_options.get("priority_steps", [0, 3, 6, 9]))
    return [f"{queue}{sep}{step}" if step else queue for step in steps]


class QueueBacklog(Collector):
    """``taskexec_queue_length``: LLEN of each queue's priority lists, summed, at scrape time."""

    def __init__(self, redis: Redis, lists: Mapping[str, list[str]]) -> None:
        self.redis = redis
        self.lists = lists

    def describe(self) -> Iterable[Metric]:
        """The family without samples, so registering does not touch Redis."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """One gauge sample per queue; none when Redis does not answer."""
        family = self._family()
        try:
            pipe = self.redis.pipeline(transaction=False)
            for names in self.lists.values():
                for name in names:
                    pipe.llen(name)
            sizes = iter(pipe.execute())
        except RedisError as e:
            log.warning("queue lengths not read: %s", e)
            return [family]
        for queue, names in self.lists.items():
            family.add_metric([queue], sum(int(next(sizes)) for _ in names))
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "taskexec_queue_length", "Messages waiting in the broker, by queue.", labels=["queue"]
        )


class WorkersOnline(Collector):
    """``taskexec_workers_online``: workers whose heartbeats the exporter receives."""

    def __init__(self, state: Any, lock: threading.Lock) -> None:
        self.state = state
        self.lock = lock

    def describe(self) -> Iterable[Metric]:
        """The family without samples."""
        return [GaugeMetricFamily("taskexec_workers_online", "Workers sending heartbeats.")]

    def collect(self) -> Iterator[Metric]:
        """The number of workers alive now."""
        with self.lock:
            alive = sum(1 for _ in self.state.alive_workers())
        yield GaugeMetricFamily("taskexec_workers_online", "Workers sending heartbeats.", value=alive)
