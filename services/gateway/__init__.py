"""The HTTP gateway (FastAPI). It never imports torch, diffusers or `workers`: it validates, stores,
records the job row and enqueues a task by name."""
