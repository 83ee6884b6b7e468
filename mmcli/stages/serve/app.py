"""The FastAPI app of ``mmcli serve``: its routes and error answers (the server that runs it: :mod:`.server`).

Routes: ``GET /health`` (open), ``GET /model`` (the model card), ``POST /predict`` and ``GET /openapi.json``;
the last three need ``Authorization: Bearer <token>`` (checked by :class:`~.auth.Guard` before the app reads
the request). No ``/docs`` page (Swagger UI would load its JavaScript from a CDN; the OpenAPI document can be
opened in any local viewer). Each answered prediction appends one line to the audit log (:mod:`.audit`) before
the response is sent; when that line cannot be written the request is answered 503 (fail closed), and so is a
by-id request whose patient the store cannot give.
"""
# no `from __future__ import annotations`: FastAPI must see the per-model request class, built at run time
import logging
import time
import uuid
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from mmcli import __version__
from mmcli.pipeline.errors import InputError
from mmcli.stages.serve.audit import AuditLog, AuditUnavailable
from mmcli.stages.serve.auth import AuthThrottle, Guard, token_ok
from mmcli.stages.serve.options import ServeOptions
from mmcli.stages.serve.schemas import FLOAT32_MAX, Health, PredictResponse, payload_of, request_model
from mmcli.stages.serve.service import NotFound, ServedModel, StoreUnavailable, Unprocessable, input_sha256

RETRY_AFTER_S = "30"
log = logging.getLogger("mmcli.serve")


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
        if creds is None or not token_ok(creds.credentials, token_bytes):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for e in exc.errors()[:20]:
            loc, msg = _loc(tuple(e.get("loc", ()))), str(e.get("msg", ""))
            parts = [p for p in e.get("loc", ()) if p != "body"]
            in_features = len(parts) >= 3 and parts[0] == "features" and parts[1] in dims
            if in_features and e.get("type") in ("less_than_equal", "greater_than_equal"):
                msg = f"value beyond the float32 range the model computes in (|x| <= {FLOAT32_MAX:.7g})"
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


