"""Reads and writes of the result store: the only place that writes SQL.

Every function takes a Session and never commits: the caller frames the transaction
(``with store.begin() as session``) and publishes messages only after it commits. By
what they touch: :mod:`.runs` (run rows), :mod:`.tasks` (task rows: claims, guarded
status changes), :mod:`.recovery` (what the reconciler looks for: the outbox, due times,
lost leases), :mod:`.logs` (attempts' logs). Callers use the one namespace:
``from taskexec.store import repository as repo``.
"""

from taskexec.store.repository.dag import READY, claim_ready, is_dag, unfinished
from taskexec.store.repository.logs import LogStream, add_attempt_logs, attempt_logs, logged_attempts
from taskexec.store.repository.recovery import (
    Overdue,
    clear_outbox,
    expired_approvals,
    lost_tasks,
    mark_outbox,
    mark_resent,
    overdue_tasks,
    set_due,
)
from taskexec.store.repository.runs import (
    add_run,
    bump_epoch,
    claim_stage,
    get_run,
    latest_run_id,
    load_manifest,
    log_line,
    record_incident,
    resolve_run_id,
    runs_in_flight,
    set_broker_instance,
    set_run_status,
    set_stage_cursor,
    set_stop_reason,
    start_retry,
    stop_reason,
)
from taskexec.store.repository.tasks import (
    TaskState,
    claim_attempt,
    count_failures,
    count_throttled,
    outputs_of,
    record_metrics,
    renew_lease,
    reopen_tasks,
    reset_blockers,
    set_task_status,
    set_tasks_status,
    task_state,
    task_statuses,
)

__all__ = [
    "READY",
    "LogStream",
    "Overdue",
    "TaskState",
    "add_attempt_logs",
    "add_run",
    "attempt_logs",
    "bump_epoch",
    "claim_attempt",
    "claim_ready",
    "claim_stage",
    "clear_outbox",
    "count_failures",
    "count_throttled",
    "expired_approvals",
    "get_run",
    "is_dag",
    "latest_run_id",
    "load_manifest",
    "log_line",
    "logged_attempts",
    "lost_tasks",
    "mark_outbox",
    "mark_resent",
    "outputs_of",
    "overdue_tasks",
    "record_incident",
    "record_metrics",
    "renew_lease",
    "reopen_tasks",
    "reset_blockers",
    "resolve_run_id",
    "runs_in_flight",
    "set_broker_instance",
    "set_due",
    "set_run_status",
    "set_stage_cursor",
    "set_stop_reason",
    "set_task_status",
    "set_tasks_status",
    "start_retry",
    "stop_reason",
    "task_state",
    "task_statuses",
    "unfinished",
]
