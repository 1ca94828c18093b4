"""Deleting a finished training or generation: its blobs first, then its row.

Blobs first, so that a storage outage answers 503 with everything still in place (the client tries again);
the row goes in a guarded DELETE once they are gone. The read transaction is closed before storage is
called, so no database connection waits on storage.
"""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.orm import Session

from shared.db import TERMINAL_STATUSES, Generation, Tenant, Training
from shared.errors import Conflict
from shared.storage import keys as blob_keys

from ..context import AppContext
from ..jobs import get_owned

__all__ = ["delete_generation", "delete_training"]


def delete_training(*, context: AppContext, session: Session, tenant: Tenant, training_id: str) -> None:
    """Delete an ended training, its subject photos and checkpoint (everything under its storage folder).

    404 for another tenant's; 409 ``training_active`` while it is queued or running. The adapter it produced
    is a resource of its own and stays.
    """
    row = get_owned(session, Training, training_id, tenant, "training")
    if row.status not in TERMINAL_STATUSES:
        raise Conflict(
            "training_active",
            f"training {training_id} is {row.status}; cancel it first (POST /v1/trainings/{training_id}/cancel) "
            "and delete it once it has stopped",
        )
    keys = [*row.image_keys, *([row.checkpoint_key] if row.checkpoint_key else [])]
    _delete_ended(context, session, row, keys, blob_keys.training_folder(row.tenant_id, training_id))


def delete_generation(*, context: AppContext, session: Session, tenant: Tenant, generation_id: str) -> None:
    """Delete an ended generation and its images. 404 for another tenant's; 409 ``generation_active`` while it
    is queued or running. A batch it belonged to keeps its ``total``; its counts and ids no longer include it.
    """
    row = get_owned(session, Generation, generation_id, tenant, "generation")
    if row.status not in TERMINAL_STATUSES:
        raise Conflict(
            "generation_active",
            f"generation {generation_id} is {row.status}; delete it once it has finished",
        )
    keys = [image["key"] for image in row.images or []]
    _delete_ended(context, session, row, keys, blob_keys.generation_folder(row.tenant_id, generation_id))


def _delete_ended(context: AppContext, session: Session, row: Training | Generation, keys: list[str], folder: str):
    """Delete the blobs ``keys`` and everything under ``folder``, then the row if it is still ended. Commits."""
    model, row_id, tenant_id = type(row), row.id, row.tenant_id
    session.rollback()  # ends the read transaction: storage calls may be slow
    for key in keys:
        context.storage.delete(key)
    context.storage.delete_prefix(folder)
    session.execute(
        delete(model).where(model.id == row_id, model.tenant_id == tenant_id, model.status.in_(TERMINAL_STATUSES))
    )
    session.commit()
