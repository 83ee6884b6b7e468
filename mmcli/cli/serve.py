"""``mmcli serve`` (a fitted run over HTTP) and ``mmcli audit verify`` (its audit log)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmcli.cli.app import app, audit_app, handled, say, warn
from mmcli.pipeline.errors import InputError
from mmcli.pipeline.log import stamp


def _serve_log(kw: dict[str, Any]) -> Path:
    from mmcli.stages.serve.app import default_audit_log

    audit = kw["audit_log"] or default_audit_log(kw["model"])
    return audit.parent / f"serve-{stamp()}.log"


@app.command()
@handled(log=_serve_log)
def serve(
    model: Path = typer.Option(..., "--model", help="Run folder of `mmcli fit` (or its model/ folder)."),
    token_file: Path = typer.Option(..., "--token-file", help="File holding the bearer token clients must send "
                                    "(Authorization: Bearer TOKEN); must exist and be non-empty."),
    store: Path | None = typer.Option(None, "--store", help="Feature store whose patients may be scored by id."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (no TLS: put a TLS proxy in front "
                             "before listening beyond this machine)."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free port, printed)."),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="Audit log file  (default: RUN/audit/audit.log)"),
    audit_max_mb: float = typer.Option(64.0, "--audit-max-mb", help="Rotate the audit log at this size (MB)."),
    max_instances: int = typer.Option(20000, "--max-instances", help="Most instances (tiles) in one bag."),
    max_body_mb: float = typer.Option(64.0, "--max-body-mb", help="Largest request body (MB); larger: 413."),
    top_k: int = typer.Option(10, "--top-k", help="Top-attention tiles returned per bag modality by default."),
) -> None:
    """Serve a fitted run over HTTP: GET /health, GET /model (model card), POST /predict, /docs."""
    from mmcli.stages.serve.app import serve as run_serve
    from mmcli.stages.serve.schemas import Limits

    if audit_max_mb <= 0 or max_body_mb <= 0:
        flag = "--audit-max-mb" if audit_max_mb <= 0 else "--max-body-mb"
        raise InputError(f"{flag} must be above 0.", flag=flag)
    if host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"listening on {host}: mmcli serve speaks plain HTTP; put a TLS-terminating proxy in front.")
    if token_file.is_file() and token_file.stat().st_mode & 0o077:
        warn(f"{token_file} is readable by other users; `chmod 600 {token_file}`.")
    limits = Limits(max_instances=max_instances, max_body_bytes=int(max_body_mb * 1024 * 1024),
                    default_top_k=top_k, max_top_k=max(100, top_k))
    run_serve(model, token_file, store=store, host=host, port=port, audit_log=audit_log,
              audit_max_bytes=int(audit_max_mb * 1024 * 1024), limits=limits, say=say)


@audit_app.command("verify")
@handled()
def audit_verify(
    log: Path = typer.Argument(..., help="Audit log of `mmcli serve` (its rotated LOG.NNNNNN files are read too)."),
) -> None:
    """Check the hash chain of an audit log; exit 1 naming the first edited, missing or reordered line."""
    from mmcli.stages.serve.audit import verify_log

    res = verify_log(log)
    for note in res.notes:
        warn(note)
    say(f"ok: {res.lines} lines in {len(res.files)} file(s), chain intact (last hash {res.last_hash[:16]}...)")
