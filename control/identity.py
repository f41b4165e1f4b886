"""Who is asking for a certificate: the token a sidecar sends with ``SignCertificate``, checked.

In cluster (``TokenReviewAuthenticator``) the token is the pod's projected service-account token, with
audience ``meshproxy`` (``injector.mutate.TOKEN_AUDIENCE``); the API server checks it with a TokenReview
that names our audience, so a token minted for anything else (the API server's own audience included) is
refused. The identity is the service account the API server names:
``system:serviceaccount:<namespace>:<name>``; any other user is refused.

Locally (``BootstrapTokens``) a file the operator writes maps tokens to identities, one per line, in the
spirit of the API server's ``--token-auth-file``::

    # token,namespace,service account
    9rD6E3v...43 more characters...,shop,web

The file is the credential store of the mesh's local CA, so it is refused unless it is a regular file,
owned by the control plane's user and not readable or writable by group or others (``chmod 600``). Tokens
must be at least 32 characters of ``[A-Za-z0-9._~+/=-]`` (``new_token()`` makes 43 from 256 random bits)
and appear once. A presented token is compared, in constant time, with the SHA-256 digest of every token
in the file (no early exit, so the time taken says nothing of which token or how much of one matched).
The file is read again when it changes (its inode, size or mtime), so tokens are added and revoked
without a restart; a changed file that does not pass the checks keeps the previous tokens and is logged.
A sidecar reads its token from a file (``MESHPROXY_TOKEN_FILE``; see ``meshproxy.identity``).

``authenticate(token) -> Caller`` raises ``AuthenticationError`` (the sidecar gets UNAUTHENTICATED) or
``AuthenticatorUnavailable`` (UNAVAILABLE: the API server could not be asked; the sidecar retries).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "AUDIENCE",
    "AnyAuthenticator",
    "AuthenticationError",
    "AuthenticatorUnavailable",
    "BootstrapTokens",
    "Caller",
    "TokenReviewAuthenticator",
    "add_bootstrap_token",
    "new_token",
]

log = logging.getLogger("meshproxy.control.identity")

AUDIENCE = "meshproxy"
MIN_TOKEN_LENGTH = 32
#: A token longer than this is refused before anything else (a JWT is ~1 KiB).
MAX_TOKEN_LENGTH = 16 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9._~+/=-]+")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SA_USER = re.compile(r"system:serviceaccount:([^:]+):([^:]+)")


class AuthenticationError(Exception):
    """The token does not prove an identity (UNAUTHENTICATED)."""


class AuthenticatorUnavailable(Exception):
    """The token could not be checked now (UNAVAILABLE)."""


@dataclass(frozen=True)
class Caller:
    """A verified identity."""

    namespace: str
    service_account: str
    via: str = ""

    def __str__(self) -> str:
        via = f" by {self.via}" if self.via else ""
        return f"{self.namespace}/{self.service_account}{via}"


def _names(namespace: str, service_account: str) -> bool:
    return bool(_NAME.fullmatch(namespace)) and all(_NAME.fullmatch(p) for p in service_account.split("."))


def _check_presented(token: str) -> None:
    if not token:
        raise AuthenticationError("no token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise AuthenticationError("the token is too long")


def new_token() -> str:
    """A new bootstrap token: 256 random bits, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


# ---- in cluster -------------------------------------------------------------------------------------------------


class TokenReviewAuthenticator:
    """Checks projected service-account tokens with the API server's TokenReview (audience ``audience``).

    Successful reviews are remembered for ``cache_seconds`` by the token's digest, so a fleet restarting
    at once does not send the API server one review per worker."""

    def __init__(
        self,
        api_client,
        audience: str = AUDIENCE,
        *,
        request_timeout: float = 10.0,
        cache_seconds: float = 60.0,
        cache_size: int = 10_000,
    ) -> None:
        from kubernetes import client

        self._api = client.AuthenticationV1Api(api_client)
        self.audience = audience
        self._timeout = request_timeout
        self._cache_seconds = cache_seconds
        self._cache_size = cache_size
        self._cache: OrderedDict[bytes, tuple[float, Caller]] = OrderedDict()
        self._lock = threading.Lock()

    async def authenticate(self, token: str) -> Caller:
        _check_presented(token)
        digest = hashlib.sha256(token.encode()).digest()
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None and hit[0] > now:
                return hit[1]
        loop = asyncio.get_running_loop()
        caller = await loop.run_in_executor(None, self._review, token)
        with self._lock:
            self._cache[digest] = (now + self._cache_seconds, caller)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return caller

    def _review(self, token: str) -> Caller:
        import urllib3
        from kubernetes.client.exceptions import ApiException

        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            review = self._api.create_token_review(body, _request_timeout=self._timeout)
        except ApiException as e:
            raise AuthenticatorUnavailable(f"TokenReview: {e.status} {e.reason}") from None
        except urllib3.exceptions.HTTPError as e:
            raise AuthenticatorUnavailable(f"TokenReview: {e}") from None
        status = review.status
        if status is None or not status.authenticated:
            error = (status.error if status is not None else None) or "not authenticated"
            raise AuthenticationError(f"token refused by the API server: {error}")
        # A reviewer that ignored our audience would answer for another; the answer must name ours.
        if status.audiences is not None and self.audience not in status.audiences:
            raise AuthenticationError(f"the token is not for audience {self.audience!r}")
        username = status.user.username if status.user is not None else ""
        m = _SA_USER.fullmatch(username or "")
        if m is None or not _names(m.group(1), m.group(2)):
            raise AuthenticationError(f"{username!r} is not a service account")
        return Caller(m.group(1), m.group(2), "TokenReview")


# ---- locally ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    caller: Caller


def _parse_tokens(text: str, source: str) -> list[_Entry]:
    entries: list[_Entry] = []
    seen: set[bytes] = set()
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            raise ValueError(f"{source}:{n}: expected token,namespace,service-account")
        token, namespace, sa = parts
        if len(token) < MIN_TOKEN_LENGTH or len(token) > MAX_TOKEN_LENGTH or not _TOKEN.fullmatch(token):
            raise ValueError(
                f"{source}:{n}: a token must be {MIN_TOKEN_LENGTH} or more characters of [A-Za-z0-9._~+/=-]"
            )
        if not _names(namespace, sa):
            raise ValueError(f"{source}:{n}: {namespace!r}/{sa!r} is not a namespace and service account")
        digest = hashlib.sha256(token.encode()).digest()
        if digest in seen:
            raise ValueError(f"{source}:{n}: this token is already on an earlier line")
        seen.add(digest)
        entries.append(_Entry(digest, Caller(namespace, sa, "bootstrap token")))
    return entries


def _check_file(path: Path) -> os.stat_result:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: not a regular file")
    if st.st_mode & 0o077:
        raise ValueError(f"{path}: group or others may access it (mode {st.st_mode & 0o777:o}): chmod 600 it")
    if st.st_uid != os.geteuid():
        raise ValueError(f"{path}: owned by uid {st.st_uid}, not by this process's user ({os.geteuid()})")
    return st


class BootstrapTokens:
    """Tokens from a file (see the module's docstring). Made with a file that fails the checks: ValueError."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._entries: list[_Entry] = []
        self._seen: tuple | None = None
        self._lock = threading.Lock()
        self._load(strict=True)

    def __len__(self) -> int:
        return len(self._entries)

    def _load(self, *, strict: bool) -> None:
        try:
            st = _check_file(self.path)
            key = (st.st_ino, st.st_size, st.st_mtime_ns)
            if key == self._seen:
                return
            entries = _parse_tokens(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            message = f"{self.path}: {e.strerror}" if isinstance(e, OSError) and e.strerror else str(e)
            if strict:
                raise ValueError(message) from None
            log.error("bootstrap tokens not reloaded (keeping %d): %s", len(self._entries), message)
            return
        if self._seen is not None:
            log.info("bootstrap tokens reloaded from %s: %d tokens", self.path, len(entries))
        self._entries, self._seen = entries, key

    def check(self, token: str) -> Caller:
        """The identity of ``token`` (AuthenticationError if none), in constant time over the file's tokens."""
        _check_presented(token)
        with self._lock:
            self._load(strict=False)
            entries = self._entries
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for e in entries:
            # Every entry is compared, whatever matched before.
            if hmac.compare_digest(e.digest, digest):
                found = e.caller
        if found is None:
            raise AuthenticationError("unknown bootstrap token")
        return found

    async def authenticate(self, token: str) -> Caller:
        return self.check(token)


def add_bootstrap_token(path: str | os.PathLike, namespace: str, service_account: str) -> str:
    """Append a new token for ``namespace``/``service_account`` to the file (created 0600); returns it."""
    if not _names(namespace, service_account):
        raise ValueError(f"{namespace!r}/{service_account!r} is not a namespace and service account")
    token = new_token()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{token},{namespace},{service_account}\n".encode())
    finally:
        os.close(fd)
    _check_file(Path(path))
    return token


class AnyAuthenticator:
    """The first of several authenticators that accepts the token (bootstrap tokens, then TokenReview)."""

    def __init__(self, authenticators: Iterable) -> None:
        self.authenticators = list(authenticators)

    async def authenticate(self, token: str) -> Caller:
        errors = []
        unavailable = None
        for a in self.authenticators:
            try:
                return await a.authenticate(token)
            except AuthenticationError as e:
                errors.append(str(e))
            except AuthenticatorUnavailable as e:
                unavailable = e
        if unavailable is not None:
            raise unavailable
        raise AuthenticationError("; ".join(errors) or "no authenticator")
