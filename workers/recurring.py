"""The Celery task of recurring plans: ``taskexec.fire_schedule``, sent by ``taskexec beat``.

A thin adapter over :func:`taskexec.schedules.fire`, which applies the schedule's overlap
policy and submits its runs. A firing that cannot reach the store or the broker is retried
a bounded number of times: a firing delivered an hour late is worth less than none.
"""

from __future__ import annotations

import logging
from datetime import datetime

import redis
from celery import Task
from redis.exceptions import LockError

from taskexec.celery_app import app
from taskexec.errors import ServiceUnavailableError
from taskexec.schedules import fire
from workers.tasks import runtime

__all__ = ["fire_schedule"]

log = logging.getLogger("taskexec.beat")

#: Seconds between two tries of a firing that could not reach a service, and how many.
RETRY_SECONDS, MAX_RETRIES = 5.0, 12


@app.task(
    name="taskexec.fire_schedule", bind=True, acks_late=True, ignore_result=True, max_retries=MAX_RETRIES
)
def fire_schedule(self: Task, schedule_id: str, due: str) -> None:
    """Submit the runs of a schedule's firing due at ``due`` (ISO 8601), or skip them."""
    rt = runtime()
    if rt.redis is None:  # pragma: no cover - a fleet always has Redis
        log.error("schedule %s: no Redis configured, firing dropped", schedule_id)
        return
    try:
        done = fire(rt.services, schedule_id, datetime.fromisoformat(due))
    except (ServiceUnavailableError, redis.ConnectionError, redis.TimeoutError, LockError) as e:
        if self.request.retries >= MAX_RETRIES:
            log.error("schedule %s: firing due at %s dropped: %s", schedule_id, due, e)
            return
        raise self.retry(countdown=RETRY_SECONDS, exc=e) from e
    level = logging.INFO if done.outcome == "submitted" else logging.WARNING
    log.log(level, "schedule %s: %s", schedule_id, done.message)
