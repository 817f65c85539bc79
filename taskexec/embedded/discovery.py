"""Finding the embedded fleet of a ``taskexec run`` in progress, from another command."""

from __future__ import annotations

from pathlib import Path

import redis

from taskexec.settings import Settings

__all__ = ["attach", "live_socket"]


def live_socket(home: Path) -> Path | None:
    """The socket of an embedded Redis serving a ``taskexec run`` in progress under ``home``.

    A run listens on ``home/redis-<pid>.sock``; a socket whose process is gone or that does
    not answer is left over from a run that was killed. The path returned is absolute, whatever
    ``home`` is (the default, ``.taskexec``, is relative to the working directory).
    """
    for path in sorted(Path(home).resolve().glob("redis-*.sock")):
        pid = path.stem.removeprefix("redis-")
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            continue
        client = redis.Redis(unix_socket_path=str(path), socket_connect_timeout=1, socket_timeout=2)
        try:
            if client.ping():
                return path
        except (redis.RedisError, OSError):
            continue
        finally:
            client.close()
    return None


def attach(settings: Settings) -> Settings | None:
    """Settings that reach the embedded fleet of a ``taskexec run`` in progress, if there is one.

    ``approve``, ``cancel`` and ``retry`` then act on an embedded run as on a fleet's.
    """
    home = Path(settings.home).resolve()
    sock = live_socket(home)
    if sock is None:
        return None
    return settings.model_copy(
        update={
            # An absolute path: a relative one would be read as the URL's host.
            "broker_url": f"redis+socket://{sock}",
            "database_url": settings.database_url or f"sqlite:///{home / 'taskexec.db'}",
            "home": home,
        }
    )
