"""Engines and sessions for the result store; Alembic migrations.

One :class:`Store` per process. Celery's prefork pool forks after the parent may have
opened connections: :meth:`Store.dispose` is called in ``worker_process_init`` so that a
child never shares a socket with its parent.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from taskexec.errors import DatabaseUnavailableError, InvalidInputError
from taskexec.settings import Settings

__all__ = ["Store", "database_url", "engine_url", "upgrade"]

_MIGRATIONS = Path(__file__).parent / "migrations"

log = logging.getLogger(__name__)


def database_url(settings: Settings) -> str:
    """The store's SQLAlchemy URL: ``TASKEXEC_DATABASE_URL``, or SQLite under home when embedded."""
    if settings.database_url:
        return settings.database_url
    if settings.embedded:
        return f"sqlite:///{(settings.home / 'taskexec.db').resolve()}"
    raise InvalidInputError(
        "TASKEXEC_DATABASE_URL must be set when TASKEXEC_BROKER_URL is", path="TASKEXEC_DATABASE_URL"
    )


def engine_url(url: str) -> str:
    """``url`` with the PostgreSQL driver taskexec ships (psycopg2) when it names none.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not installed;
    ``postgresql+psycopg://`` and other explicit drivers are kept as given.

    >>> engine_url("postgresql://postgres@127.0.0.1/taskexec")
    'postgresql+psycopg2://postgres@127.0.0.1/taskexec'
    """
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg2://" + url.removeprefix(bare)
    return url


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (status, watch) run beside the writing workers; busy_timeout makes a
    # writer wait for the lock instead of failing at once.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    """The result store of one process: an engine and its session factory.

    Example:
        >>> store = Store("sqlite://")
        >>> store.create_all()
        >>> with store.begin() as session:
        ...     pass
    """

    def __init__(self, url: str, *, retry_seconds: float = 0.0) -> None:
        url = engine_url(url)
        self.url = url
        #: How long :meth:`begin` keeps trying to connect while the database is down
        #: (workers ride out a restart of PostgreSQL; the CLI fails at once with exit 3).
        self.retry_seconds = retry_seconds
        if url.startswith("sqlite"):
            if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
                Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(
                url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args={"connect_timeout": 5}
            )
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings, *, retry: bool = False) -> Store:
        """The store configured by ``settings``; with ``retry``, it rides out database outages."""
        return cls(database_url(settings), retry_seconds=settings.db_retry_seconds if retry else 0.0)

    def _session(self, wait: float | None = None) -> Session:
        """A session holding a connection, retried with backoff for up to ``wait`` seconds
        (default ``retry_seconds``).

        Only the connect is retried: a transaction that fails half-way is rolled back and
        reported, never replayed here (the caller's step is idempotent and is redelivered).
        """
        deadline = time.monotonic() + (self.retry_seconds if wait is None else wait)
        delay = 0.1
        while True:
            session = self._sessions()
            try:
                session.connection()
                return session
            except OperationalError as e:
                session.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DatabaseUnavailableError(
                        f"the result store is unavailable: {_first_line(e)}"
                    ) from e
                log.warning("the result store is unavailable, retrying in %.1f s: %s", delay, _first_line(e))
                time.sleep(min(delay, left))
                delay = min(delay * 2, 2.0)

    @contextmanager
    def begin(self, *, wait: float | None = None) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on error.

        Args:
            wait: How long to keep trying to connect while the database is down (default
                ``retry_seconds``). A worker holding a finished attempt's outcome waits
                longer than one that has not started anything yet.

        Raises:
            DatabaseUnavailableError: The database cannot be reached (E006).
        """
        session = self._session(wait)
        try:
            yield session
            session.commit()
        except (OperationalError, ProgrammingError) as e:
            with contextlib.suppress(SQLAlchemyError):
                session.rollback()
            if _missing_schema(e):
                raise DatabaseUnavailableError(
                    f"the result store {self.engine.url.render_as_string()} has no taskexec tables: "
                    "run `taskexec db upgrade`"
                ) from e
            if isinstance(e, ProgrammingError):
                raise
            raise DatabaseUnavailableError(f"the result store is unavailable: {_first_line(e)}") from e
        except BaseException:
            with contextlib.suppress(SQLAlchemyError):
                session.rollback()
            raise
        finally:
            session.close()

    def check(self) -> None:
        """Connect once; raise :class:`DatabaseUnavailableError` when that fails."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as e:
            raise DatabaseUnavailableError(
                f"cannot reach the result store {self.engine.url.render_as_string()}: {_first_line(e)}"
            ) from e

    def create_all(self) -> None:
        """Create the tables directly (SQLite and tests); fleets use :func:`upgrade`."""
        upgrade(self)

    def close(self) -> None:
        """Close every pooled connection (the end of a producer's work)."""
        self.engine.dispose()

    def dispose(self) -> None:
        """Drop pooled connections (after fork, at exit)."""
        self.engine.dispose(close=False)


def _missing_schema(e: Exception) -> bool:
    # SQLite says "no such table", PostgreSQL 'relation "runs" does not exist' (UndefinedTable).
    text = str(getattr(e, "orig", e))
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def _first_line(e: Exception) -> str:
    orig = getattr(e, "orig", None) or e
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def upgrade(store: Store, revision: str = "head") -> None:
    """Apply the Alembic migrations to the store's database (``taskexec db upgrade``)."""
    from alembic import command
    from alembic.config import Config

    store.check()
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", store.url.replace("%", "%%"))
    with store.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
