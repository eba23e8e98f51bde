# sse-cache proxy in a container: `docker build -t sse-cache .`, then
#   docker run -p 127.0.0.1:8000:8000 -e SSE_CACHE_UPSTREAM=https://api.openai.com sse-cache
# Every option of `sse-cache proxy` is an SSE_CACHE_* variable (docs/proxy.md); compose.yaml
# runs it with Redis.

# -- build: the wheel, with the build backend at its locked version -------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir --disable-pip-version-check -c requirements/dev.lock hatchling \
 && pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
        --wheel-dir /wheels .

# -- run: the package with the proxy, redis and zstd extras, every dependency as locked -------
FROM python:3.11-slim
COPY --from=build /wheels /wheels
COPY requirements/dev.lock /tmp/dev.lock
RUN wheel="$(ls /wheels/sse_cache-*.whl)" \
 && pip install --no-cache-dir --disable-pip-version-check -c /tmp/dev.lock \
        "${wheel}[proxy,redis,zstd]" \
 && rm -rf /wheels /tmp/dev.lock \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin sse-cache \
 && mkdir -p /data && chown sse-cache /data

ENV PYTHONUNBUFFERED=1 \
    SSE_CACHE_UPSTREAM=https://api.openai.com \
    SSE_CACHE_BACKEND=sqlite:////data/sse-cache.db \
    SSE_CACHE_HOST=0.0.0.0 \
    SSE_CACHE_PORT=8000 \
    SSE_CACHE_GRACEFUL_TIMEOUT=8

USER sse-cache
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

# Healthy when the proxy answers and reaches its backend (200); there is no curl in slim.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/_sse_cache/health' % os.environ.get('SSE_CACHE_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["sse-cache"]
CMD ["proxy"]
