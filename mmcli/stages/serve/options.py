"""The options of ``mmcli serve`` (one pydantic model, validated once at the edge; errors name the flag) and
the request-body limit derived from the served model's shapes."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import Field

from mmcli.pipeline.options import Options

if TYPE_CHECKING:  # the CLI builds its flags from this model at start-up: no numpy / pandas imported here
    from mmcli.heads.data import ModalitySpec

MB = 1024 * 1024
# bytes one number may take in a valid request: the longest JSON float ("-2.2250738585072014e-308", 24) plus a
# separator and some indentation (a pretty-printed body); a body that needs more per number is not plausible
BYTES_PER_NUMBER = 40
BODY_SLACK = 64 * 1024  # keys, patient_id, encoder ids, top_k, whitespace
DEFAULT_MAX_BODY_MB = 64.0


class ServeOptions(Options):
    """Options of ``mmcli serve``: where it listens, what one request may hold, how long a client may take."""

    host: str = Field("127.0.0.1", min_length=1, description="address to listen on (plain HTTP: keep it loopback "
                      "and put a TLS-terminating proxy in front to reach it from elsewhere)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port, 0-65535 (0: any free port, printed)")
    max_instances: int = Field(20_000, ge=1, le=10_000_000, description="most instances (tiles) in one bag, "
                               "an integer >= 1")
    max_body_mb: float | None = Field(None, gt=0, le=65536, allow_inf_nan=False, description="largest request "
                                      "body in MB (larger: 413); default: what the model's shapes and "
                                      f"--max-instances allow at {BYTES_PER_NUMBER} bytes per number, at most "
                                      f"{DEFAULT_MAX_BODY_MB:g}; a larger value is lowered to that bound")
    top_k: int = Field(10, ge=0, description="top-attention tiles returned per bag modality by default, >= 0")
    max_top_k: int = Field(100, ge=0, description="most top-attention tiles a request may ask for, >= 0 (raised "
                           "to --top-k when that is higher)")
    max_concurrency: int = Field(64, ge=1, le=100_000, description="most open connections plus requests in "
                                 "flight; above it a request gets 503 (uvicorn's limit_concurrency)")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, allow_inf_nan=False, description="seconds a client has "
                                     "to send a whole request (headers and body) once connected or after the "
                                     "previous response; a slower connection is closed")
    keep_alive_s: float = Field(5.0, gt=0, le=3600, allow_inf_nan=False, description="seconds an idle "
                                "keep-alive connection is held open between requests")
    auth_failures: int = Field(20, ge=1, le=1_000_000, description="failed token checks per client address and "
                               "minute; more get 429 (without checking the token) for the rest of that minute")
    audit_max_mb: float = Field(64.0, ge=0.001, le=1_048_576, allow_inf_nan=False, description="rotate the audit "
                                "log at this size (MB)")

    @property
    def top_k_limit(self) -> int:
        """The most ``top_k`` a request may ask for: ``max_top_k``, or the default ``top_k`` when higher."""
        return max(self.max_top_k, self.top_k)

    @property
    def audit_max_bytes(self) -> int:
        return max(1024, int(self.audit_max_mb * MB))

    def body_limit(self, specs: Sequence[ModalitySpec]) -> int:
        """The request-body limit in bytes: the largest valid request for these modalities (a bag: up to
        ``max_instances`` rows of ``dim`` features and 2 coords; a vector: ``dim`` values) at
        :data:`BYTES_PER_NUMBER` each, plus :data:`BODY_SLACK`; capped by ``--max-body-mb`` (default 64)."""
        numbers = sum(self.max_instances * (s.dim + 2) if s.kind == "bag" else s.dim for s in specs)
        derived = numbers * BYTES_PER_NUMBER + BODY_SLACK
        cap = self.max_body_mb if self.max_body_mb is not None else DEFAULT_MAX_BODY_MB
        return max(1, min(derived, math.floor(cap * MB)))
