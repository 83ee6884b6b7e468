"""Authentication of ``mmcli serve``: the bearer token (read once, refused when weak), the failed-token throttle,
and :class:`Guard`, the ASGI middleware that checks both (and the body limit) before the app reads a request.

Before the app reads a request: a client address with too many failed tokens in the last minute gets 429
without a token check; the token is checked in constant time (``hmac.compare_digest``); a body over the limit
(derived from the model's shapes, :meth:`~mmcli.stages.serve.options.ServeOptions.body_limit`) gets 413.
"""
from __future__ import annotations

import hmac
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from mmcli.pipeline.errors import InputError

PROTECTED = ("/model", "/predict", "/openapi.json")
MIN_TOKEN_CHARS = 32
MIN_TOKEN_BITS = 96.0
TOKEN_HINT = "python -c \"import secrets; print(secrets.token_urlsafe(32))\" > token.txt && chmod 600 token.txt"
THROTTLE_WINDOW_S = 60.0


# ---- the token -------------------------------------------------------------------------------------------------
def token_bits(token: str) -> float:
    """Entropy estimate of ``token`` in bits: its length times the Shannon entropy of its own characters. A
    random token scores about its true entropy or more (token_urlsafe(32): ~200); a repeated word scores low."""
    n = len(token)
    return -sum(c * math.log2(c / n) for c in Counter(token).values()) if n else 0.0


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); InputError when missing, empty or weak
    (fewer than :data:`MIN_TOKEN_CHARS` characters, or an entropy estimate under :data:`MIN_TOKEN_BITS`)."""
    path = Path(path)
    fix = f"write a long random token into it: {TOKEN_HINT}"
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the token file ({getattr(e, 'strerror', None) or e}).",
                         flag="--token-file", fix=fix) from e
    if not token:
        raise InputError(f"{path}: the token file is empty.", flag="--token-file", fix=fix)
    if any(c.isspace() for c in token) or not token.isascii():
        raise InputError(f"{path}: the token has whitespace or non-ASCII characters inside it.",
                         flag="--token-file", fix="use one line of letters, digits, '-' and '_': " + TOKEN_HINT)
    if len(token) < MIN_TOKEN_CHARS or token_bits(token) < MIN_TOKEN_BITS:
        raise InputError(f"{path}: the token is too weak ({len(token)} characters, about {token_bits(token):.0f} "
                         f"bits; at least {MIN_TOKEN_CHARS} characters and {MIN_TOKEN_BITS:.0f} bits are needed).",
                         flag="--token-file", fix=fix)
    return token


def token_ok(given: str | None, token: bytes) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for k, v in headers:
        if k.lower() == b"authorization":
            scheme, _, value = v.decode("latin-1").partition(" ")
            return value.strip() if scheme.lower() == "bearer" else None
    return None


class AuthThrottle:
    """Failed token checks per client address in fixed windows of :data:`THROTTLE_WINDOW_S`: at ``limit``
    failures the address is refused (429) for the rest of its window, without a token check. Behind a proxy
    every client has the proxy's address: one guessing client then locks out the others for a minute (fail
    closed). At most ``max_clients`` addresses are tracked (expired windows first, then the oldest go)."""

    def __init__(self, limit: int, window_s: float = THROTTLE_WINDOW_S, max_clients: int = 10_000,
                 clock: Any = time.monotonic) -> None:
        self.limit, self.window, self.max_clients, self.clock = limit, window_s, max_clients, clock
        self._seen: dict[str, tuple[float, int]] = {}  # address -> (window start, failures in it)

    def wait(self, client: str) -> float:
        """Seconds ``client`` must wait before its token is checked again (0: go ahead)."""
        start, n = self._seen.get(client, (0.0, 0))
        left = start + self.window - self.clock()
        return left if n >= self.limit and left > 0 else 0.0

    def failed(self, client: str) -> None:
        now = self.clock()
        start, n = self._seen.pop(client, (now, 0))
        self._seen[client] = (start, n + 1) if now - start < self.window else (now, 1)
        if len(self._seen) > self.max_clients:
            for k in [k for k, (s, _) in self._seen.items() if now - s >= self.window]:
                del self._seen[k]
            while len(self._seen) > self.max_clients:
                del self._seen[next(iter(self._seen))]


class Guard:
    """ASGI middleware, before the app reads a request: throttle (429) and refuse (401) protected routes
    without the token, refuse bodies over the limit (413); stamp the arrival time for the audit latency."""

    def __init__(self, app: Any, token: str, max_body_bytes: int, throttle: AuthThrottle) -> None:
        self.app, self.token, self.max_body, self.throttle = app, token.encode(), max_body_bytes, throttle

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["t0"] = time.perf_counter()
        if scope["path"] in PROTECTED:
            client = str((scope.get("client") or ("?",))[0])
            wait = self.throttle.wait(client)
            if wait > 0:
                await _throttled(wait)(scope, receive, send)
                return
            if not token_ok(_bearer(scope["headers"]), self.token):
                self.throttle.failed(client)
                await _unauthorised()(scope, receive, send)
                return
        length = next((v for k, v in scope["headers"] if k.lower() == b"content-length"), None)
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _too_large(self.max_body)(scope, receive, send)
            return
        seen, refused = 0, False

        async def counted_receive() -> dict:
            # over the limit while streaming (no or a false Content-Length): answer 413 here, then tell the app
            # the client left, so it stops reading; whatever it answers to that is dropped
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    refused = True
                    await _too_large(self.max_body)(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        await self.app(scope, counted_receive, guarded_send)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "message": message}, status_code=status, headers=headers)


def _unauthorised() -> JSONResponse:
    return JSONResponse({"detail": "missing or wrong bearer token", "message": "send 'Authorization: Bearer "
                         "<token>' with the server's --token-file token"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def _throttled(wait: float) -> JSONResponse:
    return error_response(429, f"too many failed token checks from this address; retry in {math.ceil(wait)} s",
                          {"Retry-After": str(math.ceil(wait))})


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, f"request body over the server's limit of {limit} bytes (derived from the model's "
                          "shapes and --max-instances, capped by --max-body-mb)")


