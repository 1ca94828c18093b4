# Train and infer workers: CUDA 12.4 runtime with PyTorch's CUDA wheels. The same image runs
# `alembic upgrade head` as the one-shot migrate job.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive HF_HOME=/cache/huggingface KRONA_MODEL_CACHE=/cache/krona
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11=3.11.0-1+jammy1 python3-pip=22.0.2+dfsg-1ubuntu0.5 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN groupadd --system --gid 10001 krona && useradd --system --uid 10001 --gid krona --home /app krona \
 && mkdir -p /cache && chown krona:krona /cache
# requirements-worker.txt is generated from pyproject.toml's [worker] extra (deploy/docker/requirements.py).
COPY deploy/docker/requirements-worker.txt /tmp/requirements.txt
RUN python3.11 -m pip install --index-url https://download.pytorch.org/whl/cu124 torch==2.6.0 \
 && python3.11 -m pip install -r /tmp/requirements.txt
COPY shared /app/shared
COPY workers /app/workers
COPY services /app/services
COPY migrations /app/migrations
COPY alembic.ini /app/alembic.ini
USER 10001
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python3.11", "-m", "celery", "-A", "workers.tasks", "inspect", "ping", "--timeout", "5"]
CMD ["python3.11", "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "train,infer", "--pool", "solo", "--concurrency", "1"]
