"""Who may see and do what on the dashboard: the bind check, authentication, CSRF tokens.

- **Bind.** Without auth the dashboard serves loopback addresses only: anyone who reaches
  the port could cancel runs. :func:`check_bind` refuses another address (E001).
- **Auth.** ``TASKEXEC_UI_AUTH=user:password`` (HTTP basic; the user sees every run), or
  ``TASKEXEC_UI_TOKENS=TOKEN=TENANT,...`` (``Authorization: Bearer TOKEN``; the token sees
  only its tenant's runs, ``*`` every run). Credentials are compared in constant time.
- **CSRF.** A double-submit token: a random cookie set with the first page, which every
  POST must echo (a form field or the ``X-CSRF-Token`` header). Another site can make a
  browser send the cookie, never read it. A request carrying a bearer token needs none: a
  browser never adds that header on its own.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import secrets
import socket
from dataclasses import dataclass, field

from taskexec.errors import InvalidInputError
from taskexec.settings import Settings

__all__ = [
    "CSRF_COOKIE",
    "CSRF_HEADER",
    "Access",
    "Auth",
    "Refused",
    "check_bind",
    "csrf_ok",
    "is_loopback",
    "new_csrf",
]

CSRF_COOKIE = "taskexec_csrf"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Access:
    """Who is asking: a name recorded with their actions, and the tenant they are limited to."""

    who: str
    tenant: str | None = None
    bearer: bool = False


@dataclass(frozen=True)
class Auth:
    """The configured credentials (none: an open dashboard, loopback only)."""

    basic: tuple[str, str] | None = None
    tokens: dict[str, str | None] = field(default_factory=dict)  # token -> tenant (None: all)

    @classmethod
    def from_settings(cls, settings: Settings) -> Auth:
        """Parse ``TASKEXEC_UI_AUTH`` and ``TASKEXEC_UI_TOKENS``.

        >>> a = Auth.from_settings(Settings(ui_auth="ana:pw", ui_tokens="t1=acme, t2=*"))
        >>> a.basic, a.tokens
        (('ana', 'pw'), {'t1': 'acme', 't2': None})

        Raises:
            InvalidInputError: A value that is not USER:PASSWORD or TOKEN=TENANT pairs (E001).
        """
        basic = None
        if settings.ui_auth is not None:
            user, sep, password = settings.ui_auth.get_secret_value().partition(":")
            if not sep or not user or not password:
                raise InvalidInputError("is USER:PASSWORD, both non-empty", path="TASKEXEC_UI_AUTH")
            basic = (user, password)
        tokens: dict[str, str | None] = {}
        if settings.ui_tokens is not None:
            for k, pair in enumerate(
                p for p in settings.ui_tokens.get_secret_value().split(",") if p.strip()
            ):
                token, sep, tenant = pair.strip().partition("=")
                if not sep or not token or not tenant:
                    raise InvalidInputError(
                        f"entry {k} is not TOKEN=TENANT (TENANT * for every tenant)",
                        path="TASKEXEC_UI_TOKENS",
                    )
                tokens[token] = None if tenant == "*" else tenant
        return cls(basic, tokens)

    @property
    def enabled(self) -> bool:
        """Whether any credential is configured."""
        return self.basic is not None or bool(self.tokens)

    def check(self, authorization: str | None) -> Access | None:
        """The access an ``Authorization`` header grants; ``None`` when it grants none.

        >>> Auth(basic=("ana", "pw")).check("Basic " + base64.b64encode(b"ana:pw").decode())
        Access(who='ana', tenant=None, bearer=False)
        >>> Auth(tokens={"t1": "acme"}).check("Bearer t1")
        Access(who='token:acme', tenant='acme', bearer=True)
        >>> Auth(tokens={"t1": "acme"}).check("Bearer nope") is None
        True
        """
        if not authorization:
            return None
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "basic" and self.basic is not None:
            try:
                user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            ok_user = hmac.compare_digest(user.encode(), self.basic[0].encode())
            ok_password = hmac.compare_digest(password.encode(), self.basic[1].encode())
            return Access(user) if ok_user and ok_password else None
        if scheme.lower() == "bearer":
            for token, tenant in self.tokens.items():
                if hmac.compare_digest(value.encode(), token.encode()):
                    return Access(f"token:{tenant or '*'}", tenant, bearer=True)
        return None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only loopback addresses.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0"), is_loopback("localhost")
    (True, True, False, True)
    """
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def check_bind(host: str, auth: Auth) -> None:
    """Refuse to serve a non-loopback address without credentials.

    Raises:
        InvalidInputError: ``host`` is reachable from other machines and no auth is set (E001).
    """
    if not auth.enabled and not is_loopback(host):
        raise InvalidInputError(
            f"refusing to serve the dashboard on {host} without auth: set TASKEXEC_UI_AUTH=user:password "
            "or TASKEXEC_UI_TOKENS=token=tenant, or bind 127.0.0.1",
            path="--host",
        )


def new_csrf() -> str:
    """A fresh CSRF token."""
    return secrets.token_urlsafe(24)


def csrf_ok(cookie: str | None, sent: str | None) -> bool:
    """Whether the token sent with a POST matches the cookie (both present).

    >>> csrf_ok("abc", "abc"), csrf_ok("abc", None), csrf_ok(None, None)
    (True, False, False)
    """
    return bool(cookie) and bool(sent) and hmac.compare_digest(str(cookie).encode(), str(sent).encode())


class Refused(Exception):
    """A request refused before it reaches the board (read-only, CSRF, tenant)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
