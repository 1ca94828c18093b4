# The gateway, the webhook worker and the migrate step: slim CPU image, no torch (none of them imports it).
# The same Python as the tests (3.11; tests/test_deploy.py checks the minor version).
FROM python:3.11.11-slim-bookworm

# Caches live under /cache, created and owned by the non-root user (a compose volume mounted there starts with
# that owner). The gateway needs no cache and no writable home at all: it reads a base model's UNet config
# without downloading or building the model (tests/test_gateway_readonly_home.py), so Kubernetes runs it with a
# read-only root filesystem.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/krona XDG_CACHE_HOME=/cache HF_HOME=/cache/huggingface KRONA_MODEL_CACHE=/cache/krona
WORKDIR /app
RUN groupadd --system --gid 10001 krona \
 && useradd --system --uid 10001 --gid krona --home-dir /home/krona --create-home krona \
 && mkdir -p /cache/huggingface /cache/krona && chown -R krona:krona /cache
# requirements-gateway.txt is generated from pyproject.toml's [gateway] extra (deploy/docker/requirements.py).
COPY deploy/docker/requirements-gateway.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
COPY shared /app/shared
COPY services /app/services
COPY workers /app/workers
COPY migrations /app/migrations
COPY alembic.ini /app/alembic.ini
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# KRONA_GATEWAY_WORKERS processes, each with KRONA_GATEWAY_THREADS threads and a database pool of threads + 4.
CMD ["python", "-m", "services.cli.main", "gateway", "--host", "0.0.0.0", "--port", "8000"]
