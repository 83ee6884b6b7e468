"""The FastAPI app of ``mmcli serve`` and the function that runs it under uvicorn.

Routes: ``GET /health`` (open), ``GET /model`` (the model card), ``POST /predict``, and FastAPI's ``/docs`` and
``/openapi.json`` (open). ``/model`` and ``/predict`` need ``Authorization: Bearer <token>``; the token is
checked (``hmac.compare_digest``) before the body is read, and a body over ``--max-body-mb`` is refused with
413 before it is parsed. Each answered prediction appends one line to the audit log (:mod:`.audit`) before
the response is sent.
"""
# no `from __future__ import annotations`: FastAPI must see the per-model request class, built at run time
import hmac
import logging
import signal
import socket
import threading
import time
import uuid
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
from mmcli.stages.serve.audit import DEFAULT_MAX_BYTES, AuditLog
from mmcli.stages.serve.schemas import Health, Limits, PredictResponse, payload_of, request_model
from mmcli.stages.serve.service import NotFound, ServedModel, Unprocessable, input_sha256

PROTECTED = ("/model", "/predict")
log = logging.getLogger("mmcli.serve")


def read_token(path: str | Path) -> str:
    """The bearer token in ``path`` (surrounding whitespace dropped); InputError when missing or empty."""
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the token file ({e}).", flag="--token-file",
                         fix="write a long random token into it, e.g. `python -c 'import secrets; "
                         "print(secrets.token_urlsafe(32))' > token.txt`") from e
    if not token:
        raise InputError(f"{path}: the token file is empty.", flag="--token-file",
                         fix="write a long random token into it (e.g. secrets.token_urlsafe(32))")
    if any(c.isspace() for c in token) or not token.isascii():
        raise InputError(f"{path}: the token has whitespace or non-ASCII characters inside it.",
                         flag="--token-file", fix="use one line of letters, digits, '-' and '_'")
    return token


def _token_ok(given: str | None, token: bytes) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token)


def _bearer(headers: list[tuple[bytes, bytes]]) -> str | None:
    for k, v in headers:
        if k.lower() == b"authorization":
            scheme, _, value = v.decode("latin-1").partition(" ")
            return value.strip() if scheme.lower() == "bearer" else None
    return None


class Guard:
    """ASGI middleware: refuse protected routes without the token (401) and bodies over the limit (413)
    before the app reads them; stamp the arrival time for the latency in the audit log."""

    def __init__(self, app: Any, token: str, max_body_bytes: int) -> None:
        self.app, self.token, self.max_body = app, token.encode(), max_body_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["t0"] = time.perf_counter()
        if scope["path"] in PROTECTED and not _token_ok(_bearer(scope["headers"]), self.token):
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


def _unauthorised() -> JSONResponse:
    return JSONResponse({"detail": "missing or wrong bearer token", "message": "send 'Authorization: Bearer "
                         "<token>' with the server's --token-file token"}, status_code=401,
                        headers={"WWW-Authenticate": "Bearer"})


def _too_large(limit: int) -> JSONResponse:
    msg = f"request body over the server's limit of {limit} bytes (--max-body-mb)"
    return JSONResponse({"detail": msg, "message": msg}, status_code=413)


def _loc(parts: tuple) -> str:
    text = ""
    for p in parts[1:] if parts and parts[0] == "body" else parts:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "body"


def create_app(served: ServedModel, token: str, audit: AuditLog, limits: Limits | None = None) -> FastAPI:
    """The app for one served model; every prediction is written to ``audit``."""
    limits = (limits or Limits()).check()
    Request_ = request_model(served.specs, limits)
    dims = {s.name: s for s in served.specs}
    app = FastAPI(title="mmcli serve", version=__version__,
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
            if len(parts) >= 3 and parts[0] == "features" and parts[1] in dims and parts[2] == "features":
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

    @app.get("/health", response_model=Health, summary="Liveness (no token needed)")
    def health() -> dict[str, Any]:
        return {"status": "ok", "mmcli_version": __version__, "model_sha256": served.sha256}

    @app.get("/model", summary="The model card (JSON)", dependencies=[Depends(authorised)])
    def model_card() -> dict[str, Any]:
        return served.card

    @app.post("/predict", response_model=PredictResponse, dependencies=[Depends(authorised)],
              summary="Score one patient", responses={401: {"description": "missing or wrong token"},
                                                      404: {"description": "patient_id not in --store"},
                                                      413: {"description": "body over --max-body-mb"},
                                                      422: {"description": "invalid input (the message names it)"}})
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
        except (Unprocessable, InputError) as e:
            raise HTTPException(422, str(e)) from None
        digest = input_sha256(prep.cohort, served.specs)
        t0 = getattr(request.state, "t0", None) or time.perf_counter()
        latency = round((time.perf_counter() - t0) * 1000.0, 3)
        record = {k: out.get(k) for k in ("probabilities", "predicted_class", "risk", "missing_modalities")}
        audit.append({"request_id": request_id, "model_sha256": served.sha256, "input_sha256": digest,
                      "source": "store" if body.patient_id is not None else "payload",
                      "output": {k: v for k, v in record.items() if v is not None}, "latency_ms": latency})
        return {"request_id": request_id, "model_sha256": served.sha256, "input_sha256": digest,
                "latency_ms": latency, **out}

    app.add_middleware(Guard, token=token, max_body_bytes=limits.max_body_bytes)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one); InputError when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
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
    host: str = "127.0.0.1",
    port: int = 8000,
    audit_log: str | Path | None = None,
    audit_max_bytes: int = DEFAULT_MAX_BYTES,
    limits: Limits | None = None,
    say: Any = print,
) -> None:
    """Load the model, open the audit log and serve until SIGINT / SIGTERM (uvicorn's graceful shutdown)."""
    import uvicorn

    token = read_token(token_file)
    limits = (limits or Limits()).check()
    served = ServedModel(model, store)
    served.warm_up()
    audit_path = Path(audit_log) if audit_log else default_audit_log(model)
    audit = AuditLog(audit_path, audit_max_bytes)
    try:
        app = create_app(served, token, audit, limits)
        sock = bind(host, port)
        real_port = sock.getsockname()[1]
        # log_config=None: uvicorn's records go through mmcli's command log (the serve log file, not the console)
        config = uvicorn.Config(app, log_config=None, log_level="info", server_header=False, ws="none",
                                timeout_graceful_shutdown=10, access_log=True)
        say(f"serving {served.config['head']} ({served.task}, model sha256 {served.sha256[:12]}) on "
            f"http://{host}:{real_port}  (docs: /docs; audit log: {audit_path})")
        with _stop_signals():
            uvicorn.Server(config).run(sockets=[sock])
        say(f"stopped; audit log {audit_path} holds {audit.seq} lines")
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
    """``RUN/audit/audit.log`` (beside the run's model folder)."""
    from mmcli.pipeline.rundir import MODEL_DIR, resolve_model_dir

    mdir = resolve_model_dir(model)
    return (mdir.parent if mdir.name == MODEL_DIR else mdir) / "audit" / "audit.log"
