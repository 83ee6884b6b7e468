"""The FastAPI app of ``mmcli serve`` and the function that runs it under uvicorn.

Routes: ``GET /health`` (open), ``GET /model`` (the model card), ``POST /predict`` and ``GET /openapi.json``;
the last three need ``Authorization: Bearer <token>``. No ``/docs`` page (Swagger UI would load its
JavaScript from a CDN; the OpenAPI document can be opened in any local viewer). Before the app reads a
request (:class:`Guard`): a client address with too many failed tokens in the last minute gets 429 without a
token check; the token is checked in constant time (``hmac.compare_digest``); a body over the limit (derived
from the model's shapes, :meth:`ServeOptions.body_limit`) gets 413. The connection layer
(:func:`server_config`) closes a client that does not send a whole request within ``--request-timeout``
(uvicorn itself only times out idle keep-alive connections) and answers 503 above ``--max-concurrency``
connections. Each answered prediction appends one line to the audit log (:mod:`.audit`) before the response
is sent; when that line cannot be written the request is answered 503 (fail closed).
"""
# no `from __future__ import annotations`: FastAPI must see the per-model request class, built at run time
import hmac
import logging
import math
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from mmcli import __version__
from mmcli.pipeline.errors import InputError, MmcliError
from mmcli.stages.serve.audit import AuditKey, AuditLog, AuditUnavailable, default_key_path
from mmcli.stages.serve.options import ServeOptions
from mmcli.stages.serve.schemas import FLOAT32_MAX, Health, PredictResponse, payload_of, request_model
from mmcli.stages.serve.service import NotFound, ServedModel, StoreUnavailable, Unprocessable, input_sha256

PROTECTED = ("/model", "/predict", "/openapi.json")
MIN_TOKEN_CHARS = 32
MIN_TOKEN_BITS = 96.0
TOKEN_HINT = "python -c \"import secrets; print(secrets.token_urlsafe(32))\" > token.txt && chmod 600 token.txt"
THROTTLE_WINDOW_S = 60.0
RETRY_AFTER_S = "30"
log = logging.getLogger("mmcli.serve")


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


def _token_ok(given: str | None, token: bytes) -> bool:
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
            if not _token_ok(_bearer(scope["headers"]), self.token):
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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message, "message": message}, status_code=status, headers=headers)


def _unauthorised() -> JSONResponse:
    return JSONResponse({"detail": "missing or wrong bearer token", "message": "send 'Authorization: Bearer "
                         "<token>' with the server's --token-file token"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def _throttled(wait: float) -> JSONResponse:
    return _error(429, f"too many failed token checks from this address; retry in {math.ceil(wait)} s",
                  {"Retry-After": str(math.ceil(wait))})


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"request body over the server's limit of {limit} bytes (derived from the model's shapes "
                  "and --max-instances, capped by --max-body-mb)")


def _loc(parts: tuple) -> str:
    text = ""
    for p in parts[1:] if parts and parts[0] == "body" else parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


# ---- the app -----------------------------------------------------------------------------------------------
def create_app(served: ServedModel, token: str, audit: AuditLog, options: ServeOptions | None = None) -> FastAPI:
    """The app for one served model; every prediction is written to ``audit``."""
    options = options or ServeOptions()
    Request_ = request_model(served.specs, options)
    dims = {s.name: s for s in served.specs}
    app = FastAPI(title="mmcli serve", version=__version__, docs_url=None, redoc_url=None,
                  description=f"{served.config['head']} ({served.task}) on modalities {list(dims)}; model sha256 "
                  f"{served.sha256}. Research use only; see GET /model for the model card and its limitations.")
    bearer = HTTPBearer(auto_error=False, description="the token of the server's --token-file")
    token_bytes = token.encode()

    def authorised(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is None or not _token_ok(creds.credentials, token_bytes):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors()[:20]:
            loc, msg = _loc(tuple(e.get("loc", ()))), str(e.get("msg", ""))
            parts = [p for p in e.get("loc", ()) if p != "body"]
            in_features = len(parts) >= 3 and parts[0] == "features" and parts[1] in dims
            if in_features and e.get("type") in ("less_than_equal", "greater_than_equal"):
                msg += f" [feature values must fit float32: |x| <= {FLOAT32_MAX:.7g}]"
            elif in_features and parts[2] == "features":
                s = dims[parts[1]]
                shape = f"(N, {s.dim})" if s.kind == "bag" else f"({s.dim},)"
                enc = s.encoder_id or "tabular"
                msg += f" [the model takes {parts[1]} features of shape {shape} from encoder {enc}]"
            elif e.get("type") == "extra_forbidden" and len(parts) == 2 and parts[0] == "features":
                msg += f" [the model's modalities are {list(dims)}]"
            errors.append({"loc": loc, "msg": msg, "type": e.get("type")})
        message = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:3])
        return JSONResponse({"detail": errors, "message": message}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail, "message": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             summary="Liveness (no token needed); 503 while the audit log cannot be written",
             responses={503: {"model": Health, "description": "the audit log cannot be written"}})
    def health() -> Any:
        doc = {"status": "ok", "mmcli_version": __version__, "model_sha256": served.sha256}
        problem = audit.problem
        if problem is None:
            return doc
        return JSONResponse({**doc, "status": "unavailable", "reason": "audit log unavailable"}, status_code=503)

    @app.get("/model", summary="The model card (JSON)", dependencies=[Depends(authorised)])
    def model_card() -> dict[str, Any]:
        return served.card

    @app.post("/predict", response_model=PredictResponse, dependencies=[Depends(authorised)],
              summary="Score one patient", responses={401: {"description": "missing or wrong token"},
                                                      404: {"description": "patient_id not in --store"},
                                                      413: {"description": "body over the limit"},
                                                      422: {"description": "invalid input (the message names it)"},
                                                      429: {"description": "too many failed tokens"},
                                                      503: {"description": "audit log or store unavailable"}})
    def predict(body: Request_, request: Request) -> dict[str, Any]:  # type: ignore[valid-type]
        request_id = uuid.uuid4().hex
        try:
            if body.patient_id is not None:
                prep = served.from_store(body.patient_id)
            else:
                prep = served.from_payload(payload_of(body, served.specs))
            out = served.score(prep, body.top_k)
        except NotFound as e:
            raise HTTPException(404, str(e)) from None
        except StoreUnavailable as e:
            log.error("request %s: %s", request_id, e.detail)
            raise HTTPException(503, str(e), headers={"Retry-After": RETRY_AFTER_S}) from None
        except (Unprocessable, InputError) as e:
            raise HTTPException(422, str(e)) from None
        digest = input_sha256(prep.cohort, served.specs)
        t0 = getattr(request.state, "t0", None) or time.perf_counter()
        latency = round((time.perf_counter() - t0) * 1000.0, 3)
        record = {k: out.get(k) for k in ("probabilities", "predicted_class", "risk", "missing_modalities")}
        try:
            audit.append({"request_id": request_id, "model_sha256": served.sha256, "input_sha256": digest,
                          "source": "store" if body.patient_id is not None else "payload",
                          "output": {k: v for k, v in record.items() if v is not None}, "latency_ms": latency})
        except AuditUnavailable as e:  # fail closed: no answer that the audit log does not hold
            log.error("request %s: %s", request_id, e.detail)
            raise HTTPException(503, str(e), headers={"Retry-After": RETRY_AFTER_S}) from None
        return {"request_id": request_id, "model_sha256": served.sha256, "input_sha256": digest,
                "latency_ms": latency, **out}

    app.add_middleware(Guard, token=token, max_body_bytes=options.body_limit(served.specs),
                       throttle=AuthThrottle(options.auth_failures))
    return app


# ---- the connection layer ------------------------------------------------------------------------------------
def timed_protocol(request_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a read deadline: a connection must deliver a whole request (headers and body)
    within ``request_timeout_s`` of connecting, or of the previous response, or it is closed. uvicorn has no
    such timeout (a client that connects and sends nothing, or half a header, is held forever)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    receiving = (h11.IDLE, h11.SEND_BODY)

    class TimedH11Protocol(H11Protocol):
        _deadline: Any = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(request_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state not in receiving:  # the request is in (or the connection is over)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state in receiving:
                self._arm()  # the next request (or the rest of a body answered early) has its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._deadline = None
            if self.conn.their_state in receiving and not self.transport.is_closing():
                log.info("closing a connection from %s: no whole request within %g s (--request-timeout)",
                         self.client[0] if self.client else "?", request_timeout_s)
                self.transport.close()

    return TimedH11Protocol


def server_config(app: FastAPI, options: ServeOptions, log_level: str = "info", access_log: bool = True) -> Any:
    """The uvicorn config ``mmcli serve`` runs ``app`` under (limits and timeouts of ``options``)."""
    import uvicorn

    # log_config=None: uvicorn's records go through mmcli's command log (the serve log file, not the console)
    return uvicorn.Config(app, log_config=None, log_level=log_level, server_header=False, ws="none", lifespan="off",
                          timeout_graceful_shutdown=10, access_log=access_log,
                          http=timed_protocol(options.request_timeout_s), limit_concurrency=options.max_concurrency,
                          timeout_keep_alive=options.keep_alive_s)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); InputError when it cannot be had."""
    if not 0 <= port <= 65535:
        raise InputError(f"port {port} is not a TCP port (0-65535).", flag="--port")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"cannot resolve host {host!r} ({e}).", flag="--host") from e
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}).", flag="--port",
                         fix="choose a free port, or stop what uses it") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(
    model: str | Path,
    token_file: str | Path,
    *,
    store: str | Path | None = None,
    audit_log: str | Path | None = None,
    audit_key: str | Path | None = None,
    options: ServeOptions | None = None,
    say: Any = print,
    warn: Any = print,
) -> None:
    """Load the model, open the audit log and serve until SIGINT / SIGTERM (uvicorn's graceful shutdown)."""
    import uvicorn

    options = options or ServeOptions()
    token = read_token(token_file)
    served = ServedModel(model, store)
    served.warm_up()
    audit_path = Path(audit_log) if audit_log else default_audit_log(model)
    key_path = Path(audit_key) if audit_key else default_key_path()
    key, created = AuditKey.load(key_path, create=True, log=audit_path)
    if created:
        warn(f"created a new audit key in {key_path}: keep it (it signs the audit log, and `mmcli audit verify` "
             "needs it) and keep it away from whoever may edit the log.")
    audit = AuditLog(audit_path, key, options.audit_max_bytes)
    try:
        app = create_app(served, token, audit, options)
        sock = bind(options.host, options.port)
        real_port = sock.getsockname()[1]
        say(f"serving {served.config['head']} ({served.task}, model sha256 {served.sha256[:12]}) on "
            f"http://{options.host}:{real_port}  (audit log: {audit_path}, key id {key.id})")
        with _stop_signals():
            uvicorn.Server(server_config(app, options)).run(sockets=[sock])
        problem = audit.problem
        say(f"stopped; audit log {audit_path} holds {audit.seq} lines" if problem is None
            else f"stopped; audit log {audit_path} stopped taking lines after seq {audit.seq}: {problem}")
    finally:
        audit.close()


class _Stopped(MmcliError):
    """uvicorn stopped on a signal: control flow back to the command, not an error."""


@contextmanager
def _stop_signals() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again for the old handler:
    make that a normal return (exit 0, logs closed) instead of a kill or a KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stopped(signum: int, frame: Any) -> None:
        raise _Stopped

    saved = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def default_audit_log(model: str | Path) -> Path:
    """``RUN.audit/audit.log``: beside the run folder, not in it, so ``fit --overwrite`` of the run never
    touches the log."""
    from mmcli.pipeline.rundir import MODEL_DIR, resolve_model_dir

    mdir = resolve_model_dir(model).absolute()
    run = mdir.parent if mdir.name == MODEL_DIR else mdir
    return run.with_name(run.name + ".audit") / "audit.log"
