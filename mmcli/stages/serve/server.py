"""Running the app of ``mmcli serve``: the connection layer (uvicorn with a read deadline, a concurrency limit
and keep-alive timeout; :func:`server_config`), the listening socket, and :func:`serve`, which loads the model,
opens the signed audit log and serves until SIGINT / SIGTERM."""
from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mmcli.pipeline.errors import InputError, MmcliError
from mmcli.stages.serve.app import create_app
from mmcli.stages.serve.audit import AuditKey, AuditLog, default_key_path
from mmcli.stages.serve.auth import read_token
from mmcli.stages.serve.options import ServeOptions
from mmcli.stages.serve.service import ServedModel

log = logging.getLogger("mmcli.serve")


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


def server_config(app: Any, options: ServeOptions, log_level: str = "info", access_log: bool = True) -> Any:
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

