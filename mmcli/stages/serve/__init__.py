"""``mmcli serve``: a fitted run behind a REST API (FastAPI + uvicorn) with a bearer token, pydantic-validated
inputs and a hash-chained audit log; ``mmcli audit verify`` checks that log. See :mod:`.app` (routes, server),
:mod:`.schemas` (request / response models), :mod:`.service` (the loaded model) and :mod:`.audit` (the log).
Only the audit log is imported here: verifying a log needs neither torch nor the heads."""
from mmcli.stages.serve.audit import AuditChainError, AuditLog, verify_log

__all__ = ["AuditChainError", "AuditLog", "verify_log"]
