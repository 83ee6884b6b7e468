# mmcli on CPU, serving a fitted run: `make docker` builds it (where Docker exists).
#
#   docker run --rm -p 127.0.0.1:8000:8000 \
#     -v "$PWD/runs/fusion:/model:ro" \
#     -v "$PWD/secrets/token.txt:/run/secrets/mmcli_token:ro" \
#     -v "$PWD/secrets/audit.key:/run/secrets/mmcli_audit_key:ro" \
#     -v "$PWD/audit:/audit" \
#     mmcli:latest
#
# /model: a run folder of `mmcli fit` (read-only); /run/secrets/mmcli_token: the bearer token file (at least 32
# random characters: python -c "import secrets; print(secrets.token_urlsafe(32))"); /run/secrets/mmcli_audit_key:
# the key that signs the audit log (python -c "import secrets; print(secrets.token_hex(32))"), kept apart from
# the log and needed by `mmcli audit verify --key`; /audit: the audit log (keep it on a volume).
#
# Plain HTTP. Inside the container the server must listen on 0.0.0.0 to be reachable through the published
# port, so publish it on the host's loopback only (`-p 127.0.0.1:8000:8000`, as above), never `-p 8000:8000`
# (every interface), and reach it from elsewhere only through a TLS-terminating reverse proxy (nginx, Caddy,
# Traefik) on the host or in the same Docker network; see docs/serving.md.
#
# Any other verb works too:
#   docker run --rm -v "$PWD:/work" -w /work mmcli:latest predict --model run --store s.zarr --out p.csv
FROM python:3.11-slim

# Optional: a PyTorch CPU-only wheel index URL, which makes the image several GB smaller than the default
# torch wheels (they bundle CUDA libraries that a CPU image never uses).
ARG TORCH_INDEX_URL=""

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

# libgomp1: OpenMP runtime of xgboost / torch on CPU
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/mmcli
COPY pyproject.toml README.md ./
COPY mmcli ./mmcli
# the README's install (`make install` = pip install -e ".[dev]"), without the dev extras
RUN python -m pip install --upgrade pip \
 && if [ -n "$TORCH_INDEX_URL" ]; then python -m pip install --index-url "$TORCH_INDEX_URL" torch torchvision; fi \
 && python -m pip install -e . \
 && mmcli --help > /dev/null

RUN useradd --create-home --uid 10001 mmcli && mkdir -p /audit && chown mmcli /audit
USER mmcli
VOLUME ["/audit"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

ENTRYPOINT ["mmcli"]
CMD ["serve", "--model", "/model", "--token-file", "/run/secrets/mmcli_token", "--host", "0.0.0.0", \
     "--port", "8000", "--audit-log", "/audit/audit.log", "--audit-key", "/run/secrets/mmcli_audit_key"]
