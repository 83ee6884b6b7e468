"""``mmcli serve``: a fitted run behind a REST API (FastAPI + uvicorn) with a bearer token, pydantic-validated
inputs and a signed, hash-chained audit log; ``mmcli audit verify`` checks that log. See :mod:`.app` (routes),
:mod:`.auth` (token, throttle, body limit), :mod:`.server` (uvicorn, limits and timeouts, the serve loop),
:mod:`.options` (the command's options), :mod:`.schemas` (request / response models), :mod:`.service` (the
loaded model), :mod:`.audit` (the log) and :mod:`.verify` (checking it).
Only the audit log is imported here: verifying a log needs neither torch nor the heads."""
from mmcli.stages.serve.audit import AuditChainError, AuditLog
from mmcli.stages.serve.verify import verify_log

__all__ = ["AuditChainError", "AuditLog", "verify_log"]
