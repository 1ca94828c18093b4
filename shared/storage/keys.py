"""Where every blob lives in storage: one builder per kind of blob, and the parser the retention sweep uses.

The sweep (workers/retention.py) deletes what it cannot attach to a row, so a writer whose keys drifted from
the parser would have its live files deleted. Every writer builds its keys here, and tests/test_storage_keys.py
parses every kind back.

    tenants/{tenant}/                                       everything of a tenant (deleted with it)
    tenants/{tenant}/trainings/{training}/images/{i}.{ext}  a training's subject photos
    tenants/{tenant}/trainings/{training}/checkpoint.tar    its checkpoint (factors, optimizer, RNG)
    tenants/{tenant}/adapters/{adapter}.safetensors         an adapter's file (native format)
    tenants/{tenant}/adapters/{adapter}/evaluation/{evaluation}/{i}.{ext}
                                                            an evaluation's reference photos
    tenants/{tenant}/generations/{generation}/{index}.png   a generation's images
    tenants/{tenant}/class-images/{set}/{i}.png             prior preservation's cached class images
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BlobKey",
    "adapter_file",
    "adapter_folder",
    "class_image",
    "class_image_set",
    "evaluation_folder",
    "evaluation_photo",
    "generation_folder",
    "generation_image",
    "parse",
    "tenant_folder",
    "training_checkpoint",
    "training_folder",
    "training_photo",
]


def tenant_folder(tenant_id: str) -> str:
    return f"tenants/{tenant_id}/"


def training_folder(tenant_id: str, training_id: str) -> str:
    return f"tenants/{tenant_id}/trainings/{training_id}/"


def training_photo(tenant_id: str, training_id: str, index: int, extension: str) -> str:
    return f"{training_folder(tenant_id, training_id)}images/{index:02d}.{extension}"


def training_checkpoint(tenant_id: str, training_id: str) -> str:
    return f"{training_folder(tenant_id, training_id)}checkpoint.tar"


def adapter_file(tenant_id: str, adapter_id: str) -> str:
    return f"tenants/{tenant_id}/adapters/{adapter_id}.safetensors"


def adapter_folder(tenant_id: str, adapter_id: str) -> str:
    """What belongs to the adapter besides its file (its evaluations' photos): deleted with it."""
    return f"tenants/{tenant_id}/adapters/{adapter_id}/"


def evaluation_folder(tenant_id: str, adapter_id: str, evaluation_id: str) -> str:
    return f"{adapter_folder(tenant_id, adapter_id)}evaluation/{evaluation_id}/"


def evaluation_photo(tenant_id: str, adapter_id: str, evaluation_id: str, index: int, extension: str) -> str:
    return f"{evaluation_folder(tenant_id, adapter_id, evaluation_id)}{index:02d}.{extension}"


def generation_folder(tenant_id: str, generation_id: str) -> str:
    return f"tenants/{tenant_id}/generations/{generation_id}/"


def generation_image(tenant_id: str, generation_id: str, index: int) -> str:
    return f"{generation_folder(tenant_id, generation_id)}{index}.png"


def class_image_set(tenant_id: str, set_name: str) -> str:
    return f"tenants/{tenant_id}/class-images/{set_name}"


def class_image(tenant_id: str, set_name: str, index: int) -> str:
    return f"{class_image_set(tenant_id, set_name)}/{index:05d}.png"


@dataclass(frozen=True)
class BlobKey:
    """What a key under ``tenants/`` is: its kind (training, generation, adapter, evaluation, class_images, or
    other for a layout this module does not make), its tenant, and the id of the row that keeps it (None when no
    row does: class images, other)."""

    kind: str
    tenant_id: str
    row_id: str | None


def parse(key: str) -> BlobKey:
    """The inverse of the builders above, for the retention sweep."""
    parts = key.split("/")
    tenant_id = parts[1] if len(parts) > 1 and parts[0] == "tenants" else ""
    if len(parts) >= 5 and parts[2] in ("trainings", "generations"):
        return BlobKey(parts[2][:-1], tenant_id, parts[3])
    if len(parts) == 4 and parts[2] == "adapters" and parts[3].endswith(".safetensors"):
        return BlobKey("adapter", tenant_id, parts[3].removesuffix(".safetensors"))
    if len(parts) >= 7 and parts[2] == "adapters" and parts[4] == "evaluation":
        return BlobKey("evaluation", tenant_id, parts[5])
    if len(parts) == 5 and parts[2] == "class-images":
        return BlobKey("class_images", tenant_id, None)
    return BlobKey("other", tenant_id, None)
