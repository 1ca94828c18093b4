"""Python SDK of the Krona API (DiffuseKronA adapters for Stable Diffusion, as a multi-tenant service).

>>> import krona_sdk
>>> client = krona_sdk.Client()  # base_url: $KRONA_URL or http://127.0.0.1:8000; api_key: $KRONA_API_KEY
>>> training = client.trainings.create(images="photos/", instance_prompt="a photo of sks dog",
...                                    params={"steps": 500}, wait=True,
...                                    on_progress=lambda t: print(t.phase, t.progress.step))
>>> images = client.generate("a photo of sks dog on the moon", adapter_id=training.adapter_id)

``krona_sdk.adapters`` (the ``adapters`` extra) loads adapters into a diffusers pipeline in your process.
"""

from ._async_client import AsyncClient
from ._client import Client
from ._version import __version__
from .errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequest,
    Conflict,
    Gone,
    InvalidRequest,
    JobFailedError,
    KronaError,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    UnsupportedMedia,
    WaitTimeoutError,
)
from .models import (
    PHASES,
    TERMINAL_STATUSES,
    Adapter,
    ApiKey,
    Batch,
    Capabilities,
    Generation,
    GenerationImage,
    Page,
    Tenant,
    TenantCreated,
    Training,
    TrainingEvent,
    TrainingProgress,
    Usage,
    WebhookSecret,
)

__all__ = [
    "PHASES",
    "TERMINAL_STATUSES",
    "APIConnectionError",
    "APITimeoutError",
    "Adapter",
    "ApiKey",
    "AsyncClient",
    "AuthenticationError",
    "BadRequest",
    "Batch",
    "Capabilities",
    "Client",
    "Conflict",
    "Generation",
    "GenerationImage",
    "Gone",
    "InvalidRequest",
    "JobFailedError",
    "KronaError",
    "NotFound",
    "Page",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "Tenant",
    "TenantCreated",
    "Training",
    "TrainingEvent",
    "TrainingProgress",
    "UnsupportedMedia",
    "Usage",
    "WaitTimeoutError",
    "WebhookSecret",
    "__version__",
]
