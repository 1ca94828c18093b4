# Train and infer workers: the same Python as the tests (3.11, as the gateway image) and PyTorch's CUDA build of
# the torch version the tests ran (2.13.0; the Makefile's TORCH_VERSION). The CUDA wheels carry their CUDA
# runtime, cuDNN and NCCL, so the base needs no CUDA toolkit; the host's NVIDIA driver comes in through the
# NVIDIA Container Toolkit (compose) or the device plugin (Kubernetes). cu130 (CUDA 13.0) needs driver 580 or
# newer and a Turing or newer GPU; for older drivers or GPUs build with --build-arg TORCH_INDEX=.../whl/cu126.
FROM python:3.11.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HOME=/home/krona XDG_CACHE_HOME=/cache HF_HOME=/cache/huggingface KRONA_MODEL_CACHE=/cache/krona
WORKDIR /app
# /cache/huggingface (the base model's download) and /cache/krona (tiny models) are created here owned by the
# non-root user, so that the volumes compose mounts there, and Kubernetes' emptyDir (fsGroup), are writable.
RUN groupadd --system --gid 10001 krona \
 && useradd --system --uid 10001 --gid krona --home-dir /home/krona --create-home krona \
 && mkdir -p /cache/huggingface /cache/krona && chown -R krona:krona /cache
# requirements-worker.txt is generated from pyproject.toml's [worker] extra (deploy/docker/requirements.py);
# torch comes first, from PyTorch's index for the CUDA build.
COPY deploy/docker/requirements-worker.txt /tmp/requirements.txt
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install -r /tmp/requirements.txt
COPY shared /app/shared
COPY workers /app/workers
COPY services /app/services
COPY migrations /app/migrations
COPY alembic.ini /app/alembic.ini
USER 10001
# A thread of the worker touches this file every 10 s, also during a long job (workers/tasks.py); a busy solo
# worker cannot answer `celery inspect ping`, so the check reads the file's age instead.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, sys, time; sys.exit(time.time() - os.path.getmtime('/tmp/krona-worker.alive') > 60)"]
CMD ["python", "-m", "celery", "-A", "workers.tasks", "worker", "-Q", "train,infer", "--pool", "solo", "--concurrency", "1"]
