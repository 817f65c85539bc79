"""Configuration from ``TASKEXEC_*`` environment variables, built once and passed in.

With no ``TASKEXEC_BROKER_URL`` taskexec runs in embedded mode: a private Redis server
and a SQLite store under ``TASKEXEC_HOME``.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEFAULT_ALLOWED_HANDLERS", "Settings"]

#: Handlers a worker runs when the operator allows nothing else. ``python:`` handlers
#: are never allowed by default: they run code named by the plan.
DEFAULT_ALLOWED_HANDLERS = ("shell", "http", "stub", "approval")

CommaList = Annotated[list[str], NoDecode]

_SECRET_ENTRY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")
_HOST_ENTRY = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?$")
_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\$?$")


class Settings(BaseSettings):
    """All of taskexec's configuration.

    Example:
        >>> Settings(broker_url="redis://127.0.0.1:6379/0").embedded
        False
    """

    model_config = SettingsConfigDict(env_prefix="TASKEXEC_", extra="ignore", frozen=True)

    broker_url: str | None = Field(None, description="Celery broker, a Redis URL. Unset: embedded mode.")
    result_backend: str | None = Field(
        None, description="Celery result backend (Redis only: chords need it). Default: the broker."
    )
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the result store. Default: SQLite under home."
    )
    redis_url: str | None = Field(
        None, description="Redis for rate limits, run events and locks. Default: the broker."
    )
    allowed_handlers: CommaList = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED_HANDLERS),
        description="Comma-separated handler names workers may run; `python:PREFIX` allows "
        "python handlers from modules PREFIX and PREFIX.*",
    )
    handler_modules: CommaList = Field(
        default_factory=list, description="Modules workers import to register handlers."
    )
    home: Path = Field(Path(".taskexec"), description="Embedded mode's Redis socket and SQLite file.")
    worker_concurrency: int | None = Field(
        None, ge=1, description="Prefork processes per worker. Default: the CPU count (fleet), 4 (embedded)."
    )
    visibility_timeout: int = Field(
        3600,
        ge=1,
        description="Seconds before Redis redelivers an unacked message; above the longest task timeout.",
    )
    max_task_timeout: float = Field(
        1800, gt=0, description="Largest timeout a plan may give a task; below visibility_timeout."
    )
    lease_seconds: float = Field(
        30.0,
        ge=0.5,
        le=3600,
        description="A running task's claim (and concurrency slot) lasts this long unless its worker "
        "renews it (every third of it); a lost worker's task is taken over after it.",
    )
    max_throttle_wait: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="Longest countdown of a task waiting for a token or a slot: it asks again then "
        "(a countdown stays in a worker's memory). Also kept under half of visibility_timeout.",
    )
    reconcile_interval: float = Field(
        15.0,
        ge=0.5,
        description="Seconds between two rounds of the reconciler (lost stages, leases, backoffs).",
    )
    db_retry_seconds: float = Field(
        30.0, ge=0, description="How long a store operation keeps retrying while the database is unreachable."
    )
    outcome_wait_seconds: float = Field(
        3600.0,
        ge=0,
        description="How long a worker holds a finished attempt's outcome while the database is "
        "unreachable (its lease stays alive in Redis meanwhile, so nobody runs the task again).",
    )
    resend_grace: float = Field(
        60.0,
        ge=1,
        le=86_400,
        description="Seconds past its due time (or its dispatch) before the reconciler sends a task's "
        "message again: a delayed message died with its worker, or its dispatcher died before publishing.",
    )
    max_output_bytes: int = Field(
        16 * 1024 * 1024, ge=1024, description="Largest task output (as JSON) a worker stores."
    )
    max_log_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest log an attempt keeps (its stdout, stderr, HTTP excerpt, traceback and "
        "ctx.logger lines together, secrets masked); the rest is cut, the cut marked in the text.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="Key of the HMAC-SHA256 signature of webhook bodies (header X-Taskexec-Signature). "
        "Unset: webhooks are sent unsigned.",
    )
    webhook_timeout: float = Field(10.0, gt=0, le=300, description="Seconds one webhook POST may take.")
    webhook_attempts: int = Field(
        8, ge=1, le=50, description="POSTs of one webhook at most (5xx, 429, connection errors retry)."
    )
    webhook_backoff: float = Field(
        2.0, gt=0, le=3600, description="Seconds before the first webhook retry; doubled per retry."
    )
    beat_lock_seconds: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="`taskexec beat` holds its Redis lock this long unless it renews it; a standby beat "
        "takes over at most this long after the active one died.",
    )
    beat_refresh_seconds: float = Field(
        5.0, ge=0.5, le=3600, description="How often `taskexec beat` re-reads the schedules table."
    )
    secrets: CommaList = Field(
        default_factory=list,
        description="Environment variables of the worker that plans may read as secrets ({secret: NAME}, "
        "secret_params): names, or PREFIX_* for every name that starts with PREFIX_. Unset: none. "
        "TASKEXEC_* variables (the worker's own settings) never are, even if listed.",
    )
    shell_user: str | None = Field(
        None,
        description="User (name or uid) the shell handler runs commands as, so that they can read "
        "neither the worker's environment (/proc) nor its files. The worker then needs CAP_SETUID, "
        "CAP_SETGID and CAP_KILL (root with only those). Unset: the worker's own user.",
    )
    http_allow: CommaList = Field(
        default_factory=list,
        description="Destinations the http handler and webhooks may reach although they are loopback, "
        "private, link-local, shared or cloud metadata addresses: hostnames (*.example.com for its "
        "subdomains), addresses and CIDR ranges. Unset: public addresses only.",
    )
    ui_auth: SecretStr | None = Field(
        None, description="`taskexec ui`'s basic auth, USER:PASSWORD. Unset: no auth (loopback only)."
    )
    ui_tokens: SecretStr | None = Field(
        None,
        description="`taskexec ui`'s bearer tokens, TOKEN=TENANT pairs separated by commas; a token "
        "sees only its tenant's runs (TENANT `*`: every run).",
    )
    flower_url: str | None = Field(
        None, description="Flower's base URL: the dashboard links each attempt to Flower's task page."
    )

    @field_validator("allowed_handlers", "handler_modules", "secrets", "http_allow", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not _SECRET_ENTRY.match(entry):
                raise ValueError(f"{entry!r} is not a variable name or a PREFIX_* (a bare * is not allowed)")
        return value

    @field_validator("http_allow")
    @classmethod
    def _destinations(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _HOST_ENTRY.match(entry):
                    raise ValueError(
                        f"{entry!r} is neither an address, a CIDR range nor a hostname (*.example.com)"
                    ) from None
        return value

    @field_validator("shell_user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        value = value.strip() if value else None
        if value is not None and not _USER.match(value):
            raise ValueError(f"{value!r} is not a user name or uid")
        return value

    @model_validator(mode="after")
    def _timeouts_fit(self) -> Settings:
        if self.max_task_timeout >= self.visibility_timeout:
            raise ValueError(
                f"max_task_timeout ({self.max_task_timeout:g} s) must be below visibility_timeout "
                f"({self.visibility_timeout} s): Redis would deliver a running task a second time"
            )
        return self

    @property
    def embedded(self) -> bool:
        """Whether no broker is configured, so taskexec starts its own."""
        return not self.broker_url

    def handler_allowed(self, name: str) -> bool:
        """Whether workers may run the handler ``name`` (``python:mod.sub:func`` included).

        >>> Settings(allowed_handlers="stub,python:mypkg").handler_allowed("python:mypkg.x:f")
        True
        """
        if not name.startswith("python:"):
            return name in self.allowed_handlers
        module = name.split(":")[1] if name.count(":") == 2 else ""
        if not module:
            return False
        for entry in self.allowed_handlers:
            if entry.startswith("python:"):
                prefix = entry.removeprefix("python:")
                if prefix and (module == prefix or module.startswith(prefix + ".")):
                    return True
        return False
