# mmcli on CPU, serving a fitted run: `make docker` builds it (where Docker exists).
#
#   docker run --rm -p 8000:8000 \
#     -v "$PWD/runs/fusion:/model:ro" -v "$PWD/token.txt:/run/secrets/mmcli_token:ro" -v "$PWD/audit:/audit" \
#     mmcli:latest
#
# /model: a run folder of `mmcli fit` (read-only); /run/secrets/mmcli_token: the bearer token file;
# /audit: where the hash-chained audit log is written (keep it on a volume). Any other verb works too:
#   docker run --rm -v "$PWD:/work" -w /work mmcli:latest predict --model run --store s.zarr --out p.csv
# Plain HTTP inside the container: terminate TLS in front of it.
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
     "--port", "8000", "--audit-log", "/audit/audit.log"]
