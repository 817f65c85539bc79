"""What goes out next: a run's stages, the tasks they held, and tasks sent again.

Each stage is one chord: ``chord(group(execute | validate ...), advance(run, k + 1))``.
No canvas embeds a later stage: ``advance`` reads stage k + 1 from the store when stage
k is complete, so messages stay small whatever the plan's size.

Every step is idempotent. The right to dispatch a stage is taken by a conditional UPDATE
of the run's stage cursor, so a chord body that runs twice dispatches once. Tasks are
queued into the outbox in the same transaction that decides to send them, and sent after
it commits (:func:`taskexec.run.messages.publish`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from redis import RedisError
from sqlalchemy.orm import Session

from taskexec.models import Change, ManifestTask, RunManifest, RunStatus, TaskStatus
from taskexec.run import events, faultpoints
from taskexec.run.lifecycle import finalize, request_stop, run_timed_out, skip, stage_settled, stop_waiting
from taskexec.run.messages import Publication, publish
from taskexec.run.ratelimit import RateLimiter, bucket_key
from taskexec.services import Services
from taskexec.store import repository as repo
from taskexec.store.manifests import cached_run, compiled_run
from taskexec.store.tables import utcnow

__all__ = ["dispatch", "release", "republish", "resend"]

_T = TaskStatus


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
        if statuses[t.id] is not _T.PENDING:
            continue
        bad = next((d for d in t.depends_on if statuses[d].blocking), None)
        if bad is not None:
            skipped.setdefault(f"upstream task {bad!r} ended {statuses[bad].value}", []).append(t.id)
        elif all(statuses[d] is _T.SUCCEEDED for d in t.depends_on):
            runnable.append(t)
    return runnable, skipped


def _queue(
    session: Session,
    run_id: str,
    tasks: list[ManifestTask],
    epoch: int,
    why: str,
    pace: dict[str, datetime] | None = None,
) -> tuple[list[Change], Publication]:
    """Queue pending tasks into the outbox; what changed, and what to publish after commit.

    Only the tasks this call moved are published: a release running at the same time
    publishes the rest. A paced task's ETA is its due time in the store.
    """
    publication = Publication.new([], epoch)
    changes = repo.set_tasks_status(
        session, run_id, [t.id for t in tasks], _T.QUEUED, allowed_from=[_T.PENDING], outbox=publication.token
    )
    mine = {c.task_id for c in changes}
    publication.tasks = [t for t in tasks if t.id in mine]
    publication.pace = {tid: at for tid, at in (pace or {}).items() if tid in mine}
    repo.set_due(session, run_id, publication.pace)
    started = repo.set_run_status(session, run_id, RunStatus.RUNNING, message=why) if changes else None
    return changes + ([started] if started else []), publication


def dispatch(svc: Services, run_id: str, stage: int) -> None:
    """Dispatch ``stage`` of a run, or the first later stage with work; end the run after the last.

    Tasks whose dependencies did not all succeed are ``skipped`` (E009), tasks behind an
    approval gate are held; when a stop was requested, what was not dispatched is
    ``cancelled`` (E004). An ``execution: dag`` run has one dispatch, its first: the tasks
    without upstream tasks (:func:`_dispatch_dag`).
    """
    if _is_dag(svc, run_id):
        _dispatch_dag(svc, run_id)
        return
    while True:
        changes: list[Change] = []
        publication: Publication | None = None
        with svc.store.begin() as s:
            run = repo.get_run(s, run_id)
            if RunStatus(run.status).terminal:
                return
            cr = compiled_run(s, run_id)
            m = cr.manifest
            if stage >= len(m.stages):
                break
            if not repo.claim_stage(s, run_id, stage):
                return  # another copy of this step dispatched it
            if run.stop_reason is None and run_timed_out(run, m):
                request_stop(s, run_id, "timeout")
                run.stop_reason = "timeout"
            if run.stop_reason is not None:
                changes += stop_waiting(s, run_id, run.stop_reason)
                repo.set_stage_cursor(s, run_id, len(m.stages))
                stage = len(m.stages)
            else:
                statuses = repo.task_statuses(s, run_id)
                runnable, skipped = _sort_out([cr.tasks[t] for t in m.stages[stage]], statuses)
                changes += skip(s, run_id, skipped)
                if runnable:
                    pace = _pacing(svc, m, run_id, run.tenant, runnable)
                    queued, publication = _queue(
                        s, run_id, runnable, run.epoch, f"stage {stage} dispatched", pace
                    )
                    changes += queued
        events.publish(svc.redis, changes)
        if publication is not None and publication.tasks:
            publish(svc, run_id, stage, publication)
            return
        stage += 1
    finalize(svc, run_id)


def _dispatch_dag(svc: Services, run_id: str) -> None:
    """The first dispatch of a ``dag`` run: its tasks without upstream tasks, in one group.

    The right to it is the stage cursor's (0), as a stage's; every later task is released
    by the transaction that ends its last upstream task (:mod:`taskexec.store.repository.dag`).
    """
    changes: list[Change] = []
    publication: Publication | None = None
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal or not repo.claim_stage(s, run_id, 0):
            return  # ended, or another copy of this step dispatched it
        cr = compiled_run(s, run_id)
        m = cr.manifest
        if run.stop_reason is None and run_timed_out(run, m):
            request_stop(s, run_id, "timeout")
            run.stop_reason = "timeout"
        if run.stop_reason is not None:
            changes += stop_waiting(s, run_id, run.stop_reason)
        else:
            statuses = repo.task_statuses(s, run_id)
            roots = _by_priority([t for t in m.tasks if not t.depends_on and statuses[t.id] is _T.PENDING])
            pace = _pacing(svc, m, run_id, run.tenant, roots)
            why = "dispatched: tasks without upstream tasks"
            queued, publication = _queue(s, run_id, roots, run.epoch, why, pace)
            publication.detached = True
            changes += queued
    events.publish(svc.redis, changes)
    if publication is not None and publication.tasks:
        publish(svc, run_id, None, publication)
    else:
        finalize(svc, run_id)


def _advance_dag(svc: Services, run_id: str) -> None:
    """Send a ``dag`` run's released tasks (those its settled tasks queued), or end the run.

    Called after every task of the run ends (its message is detached), after an approval
    or a retry, and by the reconciler. The rows are taken from the outbox by one
    conditional update (:func:`repo.claim_ready`): of two callers at once, each task goes
    to one; one that dies before it sends leaves them marked for the reconciler.
    """
    changes: list[Change] = []
    publication: Publication | None = None
    with svc.store.begin() as s:
        run = repo.run_head(s, run_id)  # after every task: not the row's manifest
        if RunStatus(run.status).terminal:
            return
        cr = compiled_run(s, run_id)
        m = cr.manifest
        cursor, stop_reason, limit = run.stage_cursor, run.stop_reason, m.stop.timeout
        if (
            stop_reason is None
            and limit
            and run.started_at
            and (utcnow() - run.started_at).total_seconds() > limit
        ):
            request_stop(s, run_id, "timeout")
            stop_reason = "timeout"
        if stop_reason is not None:
            changes += stop_waiting(s, run_id, stop_reason)
            over = True
        else:
            publication = Publication.new([], run.epoch, detached=True)
            taken = repo.claim_ready(s, run_id, publication.token) if run.ready else []
            publication.tasks = _by_priority([cr.tasks[t] for t in taken])
            publication.pace = _pacing(svc, m, run_id, run.tenant, publication.tasks)
            repo.set_due(s, run_id, publication.pace)
            # Their move to queued was committed by the settle that released them, whose
            # worker published only its own task's change: the run event goes out here.
            changes += [Change(run_id, t, _T.QUEUED.value) for t in taken]
            over = not taken and not run.unfinished
    events.publish(svc.redis, changes)
    if publication is not None and publication.tasks:
        publish(svc, run_id, None, publication)
    elif cursor < 0 and stop_reason is None:
        dispatch(svc, run_id, 0)  # its first dispatch never happened
    elif over:
        finalize(svc, run_id)


def _is_dag(svc: Services, run_id: str) -> bool:
    """Whether the run is ``execution: dag``: from this process's manifest cache when it has
    the run (no transaction: this is asked after every task of a run ends)."""
    cached = cached_run(run_id)
    if cached is not None:
        return cached.manifest.execution == "dag"
    with svc.store.begin() as s:
        return repo.is_dag(s, run_id)


def _by_priority(tasks: list[ManifestTask]) -> list[ManifestTask]:
    """Highest priority first (then the plan's order): the order their messages go out."""
    return sorted(tasks, key=lambda t: -t.priority)


def release(svc: Services, run_id: str) -> None:
    """Dispatch held tasks whose dependencies have all ended, in stages already dispatched.

    Runs after an approval is decided, after ``taskexec retry`` reopened tasks, as the body
    of the chord of each batch it sends, after a detached task ends, and from the
    reconciler, until nothing is held; then the run goes on to its next stage, or ends.
    A ``dag`` run sends what its settled tasks released instead (:func:`_advance_dag`).
    """
    if _is_dag(svc, run_id):
        _advance_dag(svc, run_id)
        return
    changes: list[Change] = []
    publication: Publication | None = None
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return
        cr = compiled_run(s, run_id)
        m = cr.manifest
        cursor, stopping = run.stage_cursor, run.stop_reason is not None
        if run.stop_reason is not None:
            changes += stop_waiting(s, run_id, run.stop_reason)
        elif cursor >= 0:
            statuses = repo.task_statuses(s, run_id)
            held = [t for t in m.tasks if t.stage <= cursor and statuses[t.id] is _T.PENDING]
            while True:  # a skip can unblock (and skip) what waits behind it
                runnable, skipped = _sort_out(held, statuses)
                if not skipped:
                    break
                changes += skip(s, run_id, skipped)
                statuses.update({t: _T.SKIPPED for ids in skipped.values() for t in ids})
            if runnable:
                queued, publication = _queue(s, run_id, runnable, run.epoch, "held tasks released")
                changes += queued
        settled = cursor >= 0 and stage_settled(s, run_id, cursor)
    events.publish(svc.redis, changes)
    if publication is not None and publication.tasks:
        publish(svc, run_id, None, publication)
    elif cursor < 0 and not stopping:
        dispatch(svc, run_id, 0)  # its first dispatch never happened
    elif settled and cursor + 1 < len(m.stages):
        dispatch(svc, run_id, cursor + 1)
    else:
        finalize(svc, run_id)


def republish(svc: Services, run_id: str, *, why: str) -> int:
    """Send again every task of a run that has a message on its way or a worker on it.

    ``taskexec resume`` and the reconciler (when the broker lost its data) call this. It
    changes no task's status: each copy finds its task in the store and does what the
    state says. A task running under a live lease is waited for (the copy comes back when
    the lease would end), never run a second time; one whose lease ran out is taken over;
    a queued one is claimed once, whichever copy comes first. The copies go out in one
    chord whose body releases the run, so it goes on to its next stage when they are done.
    Returns how many tasks were sent.
    """
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return 0
        cr = compiled_run(s, run_id)
        statuses = repo.task_statuses(s, run_id)
        active = [cr.tasks[t] for t, st in statuses.items() if st.active]
        epoch = repo.bump_epoch(s, run_id)  # new message ids: a cancel revokes these, not the lost
        publication = Publication.new(active, epoch, detached=cr.manifest.execution == "dag")
        queued = [t.id for t in active if statuses[t.id] is _T.QUEUED]
        repo.mark_outbox(s, run_id, queued, publication.token)
        repo.log_line(s, run_id, None, 0, f"{why}: {len(active)} task(s) sent again", event="resume")
    faultpoints.reached("resume.committed")
    if active:
        publish(svc, run_id, None, publication)
    else:
        release(svc, run_id)
    return len(active)


def resend(svc: Services, run_id: str, overdue: Sequence[repo.Overdue]) -> int:
    """Send again the tasks of a run whose message is overdue or was never sent (the reconciler).

    Marked first, in the outbox (a conditional update per task: a concurrent round, or a
    task that moved on meanwhile, is not marked twice), then sent as one chord whose body
    releases the run. A reconciler that dies between the two leaves the mark: the next
    round after the grace period sends them. Returns how many tasks were sent.
    """
    with svc.store.begin() as s:
        run = repo.get_run(s, run_id)
        if RunStatus(run.status).terminal:
            return 0
        cr = compiled_run(s, run_id)
        publication = Publication.new([], run.epoch, detached=cr.manifest.execution == "dag")
        publication.suffix = publication.token[:8]
        marked = repo.mark_resent(s, overdue, publication.token)
    faultpoints.reached("reconcile.marked")
    if marked:
        publication.tasks = [cr.tasks[t] for t in marked]
        publish(svc, run_id, None, publication)
    return len(marked)


def _pacing(
    svc: Services, m: RunManifest, run_id: str, tenant: str | None, tasks: list[ManifestTask]
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
    if svc.redis is None or not limited:
        return {}
    settings = svc.settings
    horizon = min(settings.max_throttle_wait, settings.visibility_timeout / 2)
    limiter = RateLimiter(svc.redis)
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
            except RedisError:
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
