"""``mmcli serve`` (a fitted run over HTTP) and ``mmcli audit verify`` (its audit log)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mmcli.cli.app import app, audit_app, handled, say, warn
from mmcli.cli.flags import model_options
from mmcli.pipeline.errors import MmcliError
from mmcli.pipeline.log import stamp
from mmcli.stages.serve.options import ServeOptions

SERVING = "Listening, limits and timeouts"


def _serve_log(kw: dict[str, Any]) -> Path | None:
    from mmcli.stages.serve.server import default_audit_log

    try:
        audit = kw["audit_log"] or default_audit_log(kw["model"])
    except MmcliError:  # the command itself names the bad --model
        return None
    return audit.parent / f"serve-{stamp()}.log"


@app.command()
@handled(log=_serve_log)
@model_options((ServeOptions, SERVING))
def serve(
    model: Path = typer.Option(..., "--model", help="Run folder of `mmcli fit` (or its model/ folder)."),
    token_file: Path = typer.Option(..., "--token-file", help="File holding the bearer token clients must send "
                                    "(Authorization: Bearer TOKEN): at least 32 random characters, e.g. python -c "
                                    "\"import secrets; print(secrets.token_urlsafe(32))\" > token.txt"),
    store: Path | None = typer.Option(None, "--store", help="Feature store whose patients may be scored by id."),
    audit_log: Path | None = typer.Option(None, "--audit-log", help="Audit log file  (default: RUN.audit/audit.log "
                                          "beside the run folder)"),
    audit_key: Path | None = typer.Option(None, "--audit-key", help="HMAC key file that signs the audit log, "
                                          "outside the log's folder; created when absent  (default: "
                                          "~/.config/mmcli/audit.key)"),
    **options: Any,
) -> None:
    """Serve a fitted run over HTTP: GET /health, GET /model (model card), POST /predict, GET /openapi.json."""
    from mmcli.stages.serve.server import serve as run_serve

    opts = ServeOptions.build(options)
    if opts.host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"listening on {opts.host}: mmcli serve speaks plain HTTP; put a TLS-terminating proxy in front.")
    if token_file.is_file() and token_file.stat().st_mode & 0o077:
        warn(f"{token_file} is readable by other users; `chmod 600 {token_file}`.")
    run_serve(model, token_file, store=store, audit_log=audit_log, audit_key=audit_key, options=opts, say=say,
              warn=warn)


@audit_app.command("verify")
@handled()
def audit_verify(
    log: Path = typer.Argument(..., help="Audit log of `mmcli serve` (its rotated LOG.NNNNNN files are read too)."),
    key: Path | None = typer.Option(None, "--key", help="The --audit-key file of the server  (default: "
                                    "~/.config/mmcli/audit.key)"),
    anchor: str | None = typer.Option(None, "--anchor", help="SEQ:HASH printed by an earlier verify and kept "
                                      "outside the log's folder: it must still be in the chain."),
) -> None:
    """Check the signed hash chain of an audit log; exit 1 naming the first edited, forged, missing or reordered
    line."""
    from mmcli.stages.serve.audit import AuditKey, default_key_path
    from mmcli.stages.serve.verify import parse_anchor, verify_log

    at = parse_anchor(anchor) if anchor is not None else None
    secret, _ = AuditKey.load(key or default_key_path(), flag="--key")
    res = verify_log(log, secret, at)
    for note in res.notes:
        warn(note)
    say(f"ok: {res.lines} lines in {len(res.files)} file(s), chain intact and signed with key id {secret.id}; "
        f"anchor {res.lines}:{res.last_hash}")
