"""Stage-by-stage dispatch and the end of a run; shared by the producer and ``advance``.

Each stage is one chord: ``chord(group(execute | validate ...), advance(run, k + 1))``.
No canvas embeds a later stage: ``advance`` reads stage k + 1 from the store when stage
k is complete, so messages stay small whatever the plan's size. Messages carry ids, never
params or outputs.

Every step is idempotent. The right to dispatch a stage is taken by a conditional UPDATE
of the run's stage cursor, so a chord body that runs twice dispatches once; a run ends by
a conditional UPDATE of its status, so it ends once.

Publication is an outbox. The transaction that queues tasks marks their rows with a token
(``executions.outbox``); the token is cleared once the broker took the messages. A
dispatcher that dies or loses the broker between the two leaves the token, and the
reconciler sends those tasks after ``TASKEXEC_RESEND_GRACE``: an extra copy is harmless,
the claim in the store lets one run. A broker failure here is never the run's failure:
the run stays ``running`` and the failure is recorded on it as an incident.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from celery import Celery, chord
from celery.canvas import Signature
from sqlalchemy import update
from sqlalchemy.orm import Session

from taskexec import events, faultpoints
from taskexec.celery_app import CONTROL, EXECUTOR, VALIDATOR
from taskexec.errors import DatabaseUnavailableError
from taskexec.models import ErrorCode, ManifestTask, RunManifest, RunStatistics, RunStatus, TaskStatus
from taskexec.ratelimit import RateLimiter, bucket_key
from taskexec.settings import Settings
from taskexec.store import Store, results
from taskexec.store import repository as repo
from taskexec.store.tables import Run, utcnow

__all__ = [
    "CompiledRun",
    "abandon",
    "IDENTITY_KEY",
    "compiled_run",
    "dispatch",
    "finalize",
    "broker_instance",
    "execute_signature",
    "release",
    "republish",
    "resend",
    "send_release",
    "stage_settled",
    "message_id",
    "request_stop",
    "send_dispatch",
    "send_notice",
]

log = logging.getLogger(__name__)

#: Seconds a handler may run past its time limit before its process is ended.
HARD_LIMIT_GRACE = 10.0

#: The broker's identity: a token taskexec keeps in the broker's own Redis. A Redis that
#: restarted with its data (AOF, RDB) still has it; one that lost its data does not, and
#: the reconciler then sends again what the runs had in flight.
IDENTITY_KEY = "taskexec:broker:identity"


@dataclass(frozen=True)
class CompiledRun:
    """A run's manifest with lookups, cached per process: manifests never change."""

    manifest: RunManifest
    tasks: dict[str, ManifestTask] = field(default_factory=dict)
    producers: dict[str, list[str]] = field(default_factory=dict)  # artifact -> task ids (case order)


#: run id -> parsed manifest, per process (bounded: cleared when it grows past 256 runs).
_by_run: dict[str, CompiledRun] = {}


def compiled_run(session: Session, run_id: str) -> CompiledRun:
    """The manifest of a run, parsed once per process."""
    found = _by_run.get(run_id)
    if found is None:
        run = repo.get_run(session, run_id)
        found = _parse(run.manifest)
        if len(_by_run) > 256:
            _by_run.clear()
        _by_run[run_id] = found
    return found


def _parse(manifest: dict[str, Any]) -> CompiledRun:
    m = RunManifest.model_validate(manifest)
    producers: dict[str, list[str]] = {}
    for t in m.tasks:
        if t.output:
            producers.setdefault(t.output, []).append(t.id)
    return CompiledRun(m, {t.id: t for t in m.tasks}, producers)


def message_id(run_id: str, task_id: str, epoch: int) -> str:
    """The Celery id of a task's execute message: known without a lookup, so cancel can revoke it."""
    return f"{run_id}/{task_id}/{epoch}"


def execute_signature(
    app: Celery,
    run_id: str,
    task: ManifestTask,
    *,
    task_id: str | None = None,
    detached: bool = False,
    countdown: float | None = None,
    eta: datetime | None = None,
) -> Signature:
    """The ``execute`` (``| validate`` when the task has criteria) of one task, with its
    priority and an ``argsrepr`` of ids (never params: they may hold secrets).

    Every message that executes a task is built here: a stage's chord, a re-execution after
    failed criteria, a detached delivery of the reconciler. No Celery time limit: the
    worker counts the task's ``timeout`` around its handler alone (``workers.timelimit``),
    so time spent waiting for the store is never charged to it.
    """
    where = f"run={run_id} task={task.id} stage={task.stage}" + (" detached" if detached else "")
    opts: dict[str, Any] = {
        "queue": EXECUTOR,
        # Redis priority steps: 0 is consumed first; a plan's 9 is its highest priority.
        "priority": 9 - task.priority,
        "argsrepr": where,
    }
    if task_id is not None:
        opts["task_id"] = task_id
    if countdown is not None:
        opts["countdown"] = countdown
    if eta is not None:
        opts["eta"] = eta
    kwargs = {"detached": True} if detached else {}
    sig = app.signature(
        "taskexec.execute", args=(run_id, task.id), kwargs=kwargs, options=opts, immutable=True
    )
    if task.validate_:
        check: dict[str, Any] = {"queue": VALIDATOR, "priority": 9 - task.priority, "argsrepr": where}
        if task_id is not None:
            check["task_id"] = f"{task_id}/v"
        sig = sig | app.signature("taskexec.validate", options=check)
    return sig


def _signature(
    app: Celery, run_id: str, task: ManifestTask, epoch: int, eta: datetime | None = None, suffix: str = ""
) -> Signature:
    msg_id = message_id(run_id, task.id, epoch) + (f".{suffix}" if suffix else "")
    return execute_signature(app, run_id, task, task_id=msg_id, eta=eta)


def send_dispatch(app: Celery, run_id: str, stage: int) -> None:
    """Ask a control worker to dispatch ``stage`` of a run (submit and resume do this).

    The producer publishes one small message rather than the stage's chord: the chord is
    built where every later one is, and ``ignore_result`` keeps the Redis result backend
    from subscribing the producer to a result channel it would never read (a pending
    result whose ``__del__`` reconnects to Redis at interpreter exit).
    """
    app.send_task(
        "taskexec.dispatch",
        args=(run_id, stage),
        queue=CONTROL,
        ignore_result=True,
        argsrepr=f"run={run_id} stage={stage}",
    )


def request_stop(session: Session, run_id: str, reason: str) -> bool:
    """Mark a run as stopping (cancelled, max_failures, timeout); true if this call did it."""
    stmt = (
        update(Run)
        .where(Run.run_id == run_id, Run.stop_reason.is_(None))
        .values(stop_reason=reason, updated_at=utcnow())
    )
    return bool(session.execute(stmt).rowcount)  # type: ignore[attr-defined]


def _run_timed_out(run: Run, manifest: RunManifest) -> bool:
    limit = manifest.stop.timeout
    return bool(limit and run.started_at and (utcnow() - run.started_at).total_seconds() > limit)


#: Ended without success: a task downstream of one of these is skipped (E009).
_BLOCKING = frozenset(s for s in TaskStatus if s.terminal and s is not TaskStatus.SUCCEEDED)


def _sort_out(
    tasks: Sequence[ManifestTask], statuses: dict[str, TaskStatus]
) -> tuple[list[ManifestTask], dict[str, list[str]]]:
    """Which pending tasks can run now, and which are skipped (by reason); the rest are held.

    A task runs when every dependency succeeded, is skipped when one ended without success,
    and is held (left pending) while one has not ended: an approval gate it waits for, or
    a task held itself.
    """
    runnable: list[ManifestTask] = []
    skipped: dict[str, list[str]] = {}
    for t in tasks:
        if statuses[t.id] is not TaskStatus.PENDING:
            continue
        bad = next((d for d in t.depends_on if statuses[d] in _BLOCKING), None)
        if bad is not None:
            skipped.setdefault(f"upstream task {bad!r} ended {statuses[bad].value}", []).append(t.id)
        elif all(statuses[d] is TaskStatus.SUCCEEDED for d in t.depends_on):
            runnable.append(t)
    return runnable, skipped


def _skip(session: Session, run_id: str, skipped: dict[str, list[str]]) -> list[repo.Change]:
    changes: list[repo.Change] = []
    for why, ids in sorted(skipped.items()):
        changes += repo.set_tasks_status(
            session,
            run_id,
            ids,
            TaskStatus.SKIPPED,
            allowed_from=[TaskStatus.PENDING],
            error_code=ErrorCode.UPSTREAM_FAILED,
            message=why,
        )
    return changes


def _stop_everything(session: Session, run: Run, manifest: RunManifest) -> list[repo.Change]:
    """A stopped run: what has not started (or waits for a decision) is cancelled."""
    return repo.set_tasks_status(
        session,
        run.run_id,
        [t.id for t in manifest.tasks],
        TaskStatus.CANCELLED,
        allowed_from=[TaskStatus.PENDING, TaskStatus.WAITING_APPROVAL],
        error_code=ErrorCode.CANCELLED,
        message=f"run stopped: {run.stop_reason}",
    )


@dataclass
class _Publication:
    """Tasks queued by one committed transaction, to be sent after it: one outbox token."""

    tasks: list[ManifestTask]
    epoch: int
    token: str
    pace: dict[str, datetime] = field(default_factory=dict)
    #: Added to the message ids of copies sent again in the same epoch (the reconciler's).
    suffix: str = ""


def outbox_key(token: str) -> str:
    """The Redis key a live publisher keeps while it sends the messages of ``token``."""
    return f"taskexec:outbox:{token}"


class _Sending(threading.Thread):
    """Says "still publishing" (a short-lived Redis key) while a large chord goes out.

    A chord of 20,000 tasks takes seconds to publish; without this the reconciler would
    take its rows, still in the outbox, for a dispatcher that died, and send them again.
    """

    def __init__(self, client: redis.Redis | None, token: str, ttl: float) -> None:
        super().__init__(name=f"outbox {token}", daemon=True)
        self.client, self.key, self.ttl = client, outbox_key(token), ttl
        self.done = threading.Event()

    def beat(self) -> None:
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                self.client.set(self.key, "1", px=max(1, int(self.ttl * 1000)))

    def run(self) -> None:
        while not self.done.wait(self.ttl / 3):
            self.beat()

    def __enter__(self) -> _Sending:
        self.beat()
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        if self.client is not None:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(self.key)


def _queue(
    session: Session,
    run_id: str,
    tasks: list[ManifestTask],
    epoch: int,
    why: str,
    pace: dict[str, datetime] | None = None,
) -> tuple[list[repo.Change], _Publication]:
    """Queue pending tasks into the outbox; what changed, and what to publish after commit.

    Only the tasks this call moved are published: a release running at the same time
    publishes the rest. A paced task's ETA is its due time in the store.
    """
    token = uuid.uuid4().hex
    changes = repo.set_tasks_status(
        session,
        run_id,
        [t.id for t in tasks],
        TaskStatus.QUEUED,
        allowed_from=[TaskStatus.PENDING],
        outbox=token,
    )
    mine = {c.task_id for c in changes}
    pace = {tid: at for tid, at in (pace or {}).items() if tid in mine}
    repo.set_due(session, run_id, pace)
    started = repo.set_run_status(session, run_id, RunStatus.RUNNING, message=why) if changes else None
    publication = _Publication([t for t in tasks if t.id in mine], epoch, token, pace)
    return changes + ([started] if started else []), publication


def dispatch(
    app: Celery, store: Store, run_id: str, stage: int, *, client: redis.Redis | None = None
) -> None:
    """Dispatch ``stage`` of a run, or the first later stage with work; end the run after the last.

    Tasks whose dependencies did not all succeed are ``skipped`` (E009), tasks behind an
    approval gate are held; when a stop was requested, what was not dispatched is
    ``cancelled`` (E004).
    """
    while True:
        changes: list[repo.Change] = []
        publication: _Publication | None = None
        with store.begin() as s:
            run = repo.get_run(s, run_id)
            if RunStatus(run.status).terminal:
                return
            cr = compiled_run(s, run_id)
            m = cr.manifest
            if stage >= len(m.stages):
                break
            if not repo.claim_stage(s, run_id, stage):
                return  # another copy of this step dispatched it
            if run.stop_reason is None and _run_timed_out(run, m):
                request_stop(s, run_id, "timeout")
                run.stop_reason = "timeout"
            if run.stop_reason is not None:
                changes += _stop_everything(s, run, m)
                s.execute(update(Run).where(Run.run_id == run_id).values(stage_cursor=len(m.stages)))
                stage = len(m.stages)
            else:
                statuses = repo.task_statuses(s, run_id)
                runnable, skipped = _sort_out([cr.tasks[t] for t in m.stages[stage]], statuses)
                changes += _skip(s, run_id, skipped)
                if runnable:
                    pace = _pacing(app, client, m, run_id, run.tenant, runnable)
                    queued, publication = _queue(
                        s, run_id, runnable, run.epoch, f"stage {stage} dispatched", pace
                    )
                    changes += queued
        events.publish(client, changes)
        if publication is not None and publication.tasks:
            _publish(app, store, run_id, stage, publication, client=client)
            return
        stage += 1
    finalize(store, run_id, client=client)


def release(app: Celery, store: Store, run_id: str, *, client: redis.Redis | None = None) -> None:
    """Dispatch held tasks whose dependencies have all ended, in stages already dispatched.

    Runs after an approval is decided, after ``taskexec retry`` reopened tasks, as the body
    of the chord of each batch it sends, after a detached task ends, and from the
    reconciler, until nothing is held; then the run goes on to its next stage, or ends.
    """
    changes: list[repo.Change] = []
    publication: _Publication | None = None
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return
        cr = compiled_run(s, run_id)
        m = cr.manifest
        cursor, stopping = run.stage_cursor, run.stop_reason is not None
        if stopping:
            changes += _stop_everything(s, run, m)
        elif cursor >= 0:
            statuses = repo.task_statuses(s, run_id)
            held = [t for t in m.tasks if t.stage <= cursor and statuses[t.id] is TaskStatus.PENDING]
            while True:  # a skip can unblock (and skip) what waits behind it
                runnable, skipped = _sort_out(held, statuses)
                if not skipped:
                    break
                changes += _skip(s, run_id, skipped)
                statuses.update({t: TaskStatus.SKIPPED for ids in skipped.values() for t in ids})
            if runnable:
                queued, publication = _queue(s, run_id, runnable, run.epoch, "held tasks released")
                changes += queued
        settled = cursor >= 0 and stage_settled(s, run_id, cursor)
    events.publish(client, changes)
    if publication is not None and publication.tasks:
        _publish(app, store, run_id, None, publication, client=client)
    elif cursor < 0 and not stopping:
        dispatch(app, store, run_id, 0, client=client)  # its first dispatch never happened
    elif settled and cursor + 1 < len(m.stages):
        dispatch(app, store, run_id, cursor + 1, client=client)
    else:
        finalize(store, run_id, client=client)


def republish(app: Celery, store: Store, run_id: str, *, client: redis.Redis | None, why: str) -> int:
    """Send again every task of a run that has a message on its way or a worker on it.

    ``taskexec resume`` and the reconciler (when the broker lost its data) call this. It
    changes no task's status: each copy finds its task in the store and does what the
    state says. A task running under a live lease is waited for (the copy comes back when
    the lease would end), never run a second time; one whose lease ran out is taken over;
    a queued one is claimed once, whichever copy comes first. The copies go out in one
    chord whose body releases the run, so it goes on to its next stage when they are done.
    Returns how many tasks were sent.
    """
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return 0
        cr = compiled_run(s, run_id)
        statuses = repo.task_statuses(s, run_id)
        active = [cr.tasks[t] for t, st in statuses.items() if st in repo.ACTIVE]
        epoch = repo.bump_epoch(s, run_id)  # new message ids: a cancel revokes these, not the lost
        token = uuid.uuid4().hex
        repo.mark_outbox(s, run_id, [t.id for t in active if statuses[t.id] is TaskStatus.QUEUED], token)
        repo.log_line(s, run_id, None, 0, f"{why}: {len(active)} task(s) sent again", event="resume")
    faultpoints.reached("resume.committed")
    if active:
        _publish(app, store, run_id, None, _Publication(active, epoch, token), client=client)
    else:
        release(app, store, run_id, client=client)
    return len(active)


def resend(
    app: Celery, store: Store, run_id: str, overdue: Sequence[repo.Overdue], *, client: redis.Redis | None
) -> int:
    """Send again the tasks of a run whose message is overdue or was never sent (the reconciler).

    Marked first, in the outbox (a conditional update per task: a concurrent round, or a
    task that moved on meanwhile, is not marked twice), then sent as one chord whose body
    releases the run. A reconciler that dies between the two leaves the mark: the next
    round after the grace period sends them. Returns how many tasks were sent.
    """
    token = uuid.uuid4().hex
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return 0
        cr = compiled_run(s, run_id)
        marked = repo.mark_resent(s, overdue, token)
        epoch = run.epoch
    faultpoints.reached("reconcile.marked")
    if marked:
        tasks = [cr.tasks[t] for t in marked]
        _publish(app, store, run_id, None, _Publication(tasks, epoch, token, suffix=token[:8]), client=client)
    return len(marked)


def send_release(app: Celery, run_id: str) -> None:
    """Ask a control worker to :func:`release` a run's held tasks (approve, retry)."""
    app.send_task(
        "taskexec.release", args=(run_id,), queue=CONTROL, ignore_result=True, argsrepr=f"run={run_id}"
    )


def _pacing(
    app: Celery,
    client: redis.Redis | None,
    m: RunManifest,
    run_id: str,
    tenant: str | None,
    tasks: list[ManifestTask],
) -> dict[str, datetime]:
    """Times (ETAs) that spread a stage's rate-limited tasks over what their buckets allow.

    Sent all at once, the tasks of a stage would all ask for a token at once, and all but
    the burst would be refused and re-queued, each refusal a trip through a worker that
    delays the tasks whose turn has come. Sent with these ETAs (the k-th task of a bucket
    when, at the rate, the bucket as it stands now will hold a token for it), they arrive
    about when their tokens do. Absolute times, not countdowns: publishing a large chord
    takes a while, and countdowns would add that to each task's time. Only a hint: the
    worker still asks the bucket. None past ``max_throttle_wait`` (a message with an ETA
    waits in a worker's memory, and Redis delivers it again past half the visibility
    timeout): those tasks ask at once, and take their turn in the bucket's line.
    """
    limited = [t for t in tasks if t.rate_limit is not None]
    if client is None or not limited:
        return {}
    settings: Settings = app.conf.taskexec_settings
    horizon = min(settings.max_throttle_wait, settings.visibility_timeout / 2)
    limiter = RateLimiter(client)
    now = datetime.now(UTC)
    pace: dict[str, datetime] = {}
    ahead: dict[str, float] = {}  # bucket -> tokens short before the next task of it
    for t in limited:
        assert t.rate_limit is not None
        limit = m.rate_limits[t.rate_limit]
        key = bucket_key(t.rate_limit, limit, run_id=run_id, tenant=tenant)
        if key not in ahead:
            try:
                tokens, _ = limiter.peek(key, limit)  # below zero by the tokens reserved
            except redis.RedisError:
                return {}
            ahead[key] = -tokens
        ahead[key] += 1
        rate = limit.per_minute / 60.0
        # A little early (half a token's time, at most 20 ms): a task that arrives late
        # leaves its token unused past the burst, a time no later task makes up; one that
        # arrives early waits in its worker for the token (workers.runner.SHORT_WAIT).
        wait = ahead[key] / rate - min(0.02, 0.5 / rate)
        if 0 < wait <= horizon:
            pace[t.id] = now + timedelta(seconds=wait)
    return pace


def _publish(
    app: Celery,
    store: Store,
    run_id: str,
    stage: int | None,
    publication: _Publication,
    *,
    client: redis.Redis | None,
) -> bool:
    """Send a chord of queued tasks, then take them out of the outbox; false if the broker
    refused it (the run goes on: the reconciler sends what is still in the outbox).

    ``stage`` is the stage dispatched (its body dispatches the next one), or ``None`` for a
    batch of released or re-sent tasks (its body releases the run again).
    """
    p = publication
    header = [_signature(app, run_id, t, p.epoch, p.pace.get(t.id), p.suffix) for t in p.tasks]
    if stage is None:
        body = app.signature(
            "taskexec.release",
            args=(run_id,),
            immutable=True,
            options={"queue": CONTROL, "argsrepr": f"run={run_id}"},
        )
    else:
        body = app.signature(
            "taskexec.advance",
            args=(run_id, stage + 1),
            immutable=True,
            options={"queue": CONTROL, "argsrepr": f"run={run_id} stage={stage + 1}"},
        )
    on_error = app.signature(
        "taskexec.stage_failed",
        args=(run_id, -1 if stage is None else stage),
        immutable=True,
        options={"queue": CONTROL, "argsrepr": f"run={run_id} stage={stage}"},
    )
    body.link_error(on_error)
    settings: Settings = app.conf.taskexec_settings
    try:
        faultpoints.reached("dispatch.committed")
        with _Sending(client, p.token, ttl=max(1.0, settings.resend_grace / 2)):
            chord(header, body, app=app).apply_async()
        faultpoints.reached("dispatch.published")
        instance = broker_instance(app)
    except Exception as e:  # kombu and redis-py raise many types for one broken connection
        what = f"messages of {len(p.tasks)} task(s) not sent ({type(e).__name__}: {e})"
        log.warning("run %s: %s; the reconciler sends them", run_id, what)
        try:
            with store.begin() as s:
                repo.record_incident(s, run_id, f"{what}; the reconciler sends them")
        except DatabaseUnavailableError:
            pass  # the outbox holds them all the same
        return False
    with store.begin() as s:
        repo.clear_outbox(s, run_id, p.token)
        s.execute(update(Run).where(Run.run_id == run_id).values(broker_instance=instance))
    return True


def broker_instance(app: Celery) -> str | None:
    """The broker's identity (:data:`IDENTITY_KEY`), created when missing.

    Not Redis's own ``run_id``: that changes at every restart, even one that kept every
    message (AOF), and sending a run's tasks again then is wasted work at best.
    """
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        token = client.get(IDENTITY_KEY)
        if token is None:
            client.set(IDENTITY_KEY, uuid.uuid4().hex, nx=True)
            token = client.get(IDENTITY_KEY)
        if isinstance(token, bytes):
            return token.decode()
        return str(token) if token is not None else None


def stage_settled(session: Session, run_id: str, stage: int) -> bool:
    """Whether no task of ``stage`` has a message on its way or a worker on it.

    The rest of the stage has ended, waits for an approval, or is held behind one: the next
    stage may go (what depends on a held task is held in turn).
    """
    return not any(s in repo.ACTIVE for s in repo.task_statuses(session, run_id, stage).values())


def finalize(store: Store, run_id: str, *, client: redis.Redis | None = None) -> RunStatus | None:
    """End a run whose tasks have all ended; ``None`` when it is not over or already ended.

    A run ends only from the store: every task terminal, or, for a run that was stopped
    (cancel, ``max_failures``, timeout), every task terminal or never dispatched (those are
    ``cancelled``). A pending task of a run that was not stopped is work still to do (a
    dispatch that failed, a stage the reconciler has yet to send): the run is not over. An
    infrastructure failure never ends a run; the reconciler recovers what it left behind.
    """
    changes: list[repo.Change] = []
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return None
        statuses = repo.task_statuses(s, run_id)
        if any(st in repo.UNSETTLED for st in statuses.values()):
            return None
        pending = [tid for tid, st in statuses.items() if st is TaskStatus.PENDING]
        if pending and run.stop_reason is None:
            return None
        if pending:
            changes += repo.set_tasks_status(
                s,
                run_id,
                pending,
                TaskStatus.CANCELLED,
                allowed_from=[TaskStatus.PENDING],
                error_code=ErrorCode.CANCELLED,
                message=f"run stopped: {run.stop_reason}",
            )
        result = results.run_result(s, run_id)
        if run.stop_reason == "cancelled":
            final = RunStatus.CANCELLED
        elif run.stop_reason == "timeout":
            final = RunStatus.TIMED_OUT
        elif all(t.status is TaskStatus.SUCCEEDED for t in result.tasks):
            final = RunStatus.SUCCEEDED
        else:
            final = RunStatus.FAILED
        now = utcnow()
        started = run.started_at or run.submitted_at
        stats = RunStatistics.of(result.tasks, round((now - started).total_seconds(), 3))
        change = repo.set_run_status(
            s,
            run_id,
            final,
            message=run.stop_reason,
            statistics=stats.model_dump(mode="json"),
            error_message=None,
            finished_at=now,
        )
        if change is None:
            return None
        changes.append(change)
        manifest = compiled_run(s, run_id).manifest
        wants_notice = any("run_finished" in n.events for n in manifest.notify)
        stopped, tenant = run.stop_reason is not None, run.tenant
    events.publish(client, changes)
    if stopped and client is not None:
        _give_back_tokens(client, run_id, tenant, manifest)
    if wants_notice:
        send_notice(run_id, "run_finished")
    return final


def abandon(store: Store, run_id: str, reason: str, *, client: redis.Redis | None = None) -> bool:
    """End a run that nothing can carry on: every unfinished task ``cancelled``, the run ``error``.

    Only the owner of a private fleet decides this (embedded mode, when its workers and its
    Redis are gone with the run's messages); a fleet's runs are never abandoned, the
    reconciler carries them on. Returns whether this call ended the run.
    """
    with store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return False
        statuses = repo.task_statuses(s, run_id)
        unfinished = [t for t, st in statuses.items() if not st.terminal]
        changes = repo.set_tasks_status(
            s, run_id, unfinished, TaskStatus.CANCELLED, error_code=ErrorCode.CANCELLED, message=reason
        )
        result = results.run_result(s, run_id)
        now = utcnow()
        started = run.started_at or run.submitted_at
        stats = RunStatistics.of(result.tasks, round((now - started).total_seconds(), 3))
        change = repo.set_run_status(
            s,
            run_id,
            RunStatus.ERROR,
            message=reason,
            statistics=stats.model_dump(mode="json"),
            error_message=reason,
            finished_at=now,
        )
    events.publish(client, [*changes, *([change] if change else [])])
    return change is not None


def _give_back_tokens(client: redis.Redis, run_id: str, tenant: str | None, manifest: RunManifest) -> None:
    """Return the tokens its buckets reserved for a stopped run's tasks that waited in line.

    Those tasks will not come back for them (they were cancelled): other runs sharing a
    bucket would otherwise wait for tokens promised to nobody until the line forgets them.
    """
    limiter = RateLimiter(client)
    for name, limit in manifest.rate_limits.items():
        key = bucket_key(name, limit, run_id=run_id, tenant=tenant)
        try:
            limiter.give_back(key, limit, run_id=run_id)
        except redis.RedisError as e:  # they come back by themselves 30 s after their turn
            log.warning("tokens of run %s not given back to %s: %s", run_id, key, e)


def send_notice(run_id: str, event: str, task_id: str | None = None) -> None:
    """Queue a webhook notice (``taskexec.notify``); it never blocks or fails the run."""
    from taskexec.celery_app import app

    try:
        app.send_task(
            "taskexec.notify",
            args=(run_id, event, task_id),
            queue=CONTROL,
            ignore_result=True,
            argsrepr=f"run={run_id} event={event}" + (f" task={task_id}" if task_id else ""),
        )
    except Exception as e:  # the broker is down: the run's own state is already safe
        log.warning("notice %s of run %s not sent: %s", event, run_id, e)


def active_task_ids(session: Session, run_id: str) -> Sequence[str]:
    """Ids of a run's tasks that are queued, running, retrying or validating."""
    return [t for t, s in repo.task_statuses(session, run_id).items() if s in repo.ACTIVE]
