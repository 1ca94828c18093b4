"""Fair scheduling across tenants: a weighted Virtual Token Counter per tenant and queue, in the database.

After Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024), the VTC of S-LoRA:

- every job has a cost in one unit, a denoising step of one 64x64-pixel image (``generation_cost``: width x
  height x steps x images; ``training_cost``: every sample of every step, its class images and its evaluation
  images; ``evaluation_cost``), so that trainings and evaluations, which share the train queue, are charged
  alike and no part of a job's work is free;
- each tenant has a counter per queue (``tenant_service``); when a worker takes a job, the tenant's
  counter grows by cost / weight (``charge``);
- a worker takes the oldest queued job of the tenant with the smallest counter (``pick``), so the
  service each tenant receives, divided by its weight, stays level among tenants with queued work;
- a tenant that had nothing queued is lifted, when it submits, to the smallest counter among the tenants
  that are waiting, or, when none wait, to the largest counter (``lift_on_submit``): idle time is not
  saved up as credit, and a new tenant starts level with the others, not at zero.

The counters live in the database, so every worker and every gateway replica (and the embedded mode's
SQLite) sees the same ones; the broker's messages only wake workers (a message takes the fairest job,
not necessarily its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from shared.db import Evaluation, Generation, Tenant, TenantService, Training, utcnow
from shared.limits import tenant_limits

if TYPE_CHECKING:
    from shared.settings import Settings
    from shared.training_spec import EvaluationRequest, TrainingSpec

__all__ = [
    "COST_UNIT_PIXELS",
    "MODELS_OF_QUEUE",
    "QUEUED_COLUMN",
    "QUEUE_OF",
    "Candidate",
    "charge",
    "evaluation_cost",
    "generation_cost",
    "is_backlogged",
    "lift_on_submit",
    "pick",
    "training_cost",
]

COST_UNIT_PIXELS = 64 * 64
# The scheduler's queue of each job model (the Celery queue of the same name serves it), and the models of each
# queue: a train worker takes trainings and evaluations in one fair order.
QUEUE_OF = {Training: "train", Evaluation: "train", Generation: "infer"}
MODELS_OF_QUEUE = {"train": (Training, Evaluation), "infer": (Generation,)}


def generation_cost(width: int, height: int, steps: int, num_images: int) -> float:
    """UNet work of a generation, in 64x64-pixel denoising steps."""
    return width * height * steps * num_images / COST_UNIT_PIXELS


# A training sample's forward and backward pass cost about three UNet forwards; a denoising step with
# classifier-free guidance, two. So one sample-step is 1.5 units.
TRAIN_SAMPLE_STEP = 1.5


def training_cost(spec: TrainingSpec, *, steps: int, resolution: int) -> float:
    """Work of a training, in 64x64 denoising steps: every sample of every optimizer step (batch size x gradient
    accumulation, doubled by prior preservation's class batch), the class images it generates, its validation
    images and its evaluation's images, each scaled by the resolution's area."""
    unit = resolution * resolution / COST_UNIT_PIXELS
    samples = spec.batch_size * spec.gradient_accumulation * (2 if spec.prior_preservation else 1)
    cost = steps * samples * TRAIN_SAMPLE_STEP
    if spec.prior_preservation:
        cost += spec.num_class_images * spec.validation_steps
    if spec.validation_prompt:
        renders = 1 + (steps // spec.validation_every if spec.validation_every else 0)
        cost += renders * spec.num_validation_images * spec.validation_steps
    request = spec.evaluation()
    if request is not None:
        cost += evaluation_cost(request, resolution) / unit
    return cost * unit


def evaluation_cost(request: EvaluationRequest, resolution: int) -> float:
    """Work of an adapter evaluation: its prompts x images per prompt, each ``steps`` denoising steps."""
    return request.prompts * request.per_prompt * request.steps * resolution * resolution / COST_UNIT_PIXELS


def _ensure_counter(session: Session, tenant_id: str, queue: str, start: float) -> None:
    """Create the tenant's counter at ``start`` unless it exists (concurrent creators: the first one wins)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    session.execute(
        insert(TenantService)
        .values(tenant_id=tenant_id, queue=queue, counter=start, updated_at=utcnow())
        .on_conflict_do_nothing(index_elements=["tenant_id", "queue"])
    )


# The tenants column that counts a model's queued jobs (kept by triggers: migrations/versions/0007_*.py).
QUEUED_COLUMN = {
    Training: Tenant.queued_trainings,
    Evaluation: Tenant.queued_evaluations,
    Generation: Tenant.queued_generations,
}


def _floor(session: Session, model, queue: str, tenant_id: str) -> float | None:
    """Where a tenant that had nothing queued starts: the smallest counter among the other tenants with queued
    jobs; when none wait, the largest counter of the queue (S-LoRA's "last client to leave": whoever was
    served last is level with the newcomer). None when the queue has no counters yet."""
    queued = or_(*(QUEUED_COLUMN[m] > 0 for m in MODELS_OF_QUEUE[queue]))
    waiting = select(Tenant.id).where(queued, Tenant.id != tenant_id)
    floor = session.scalar(
        select(func.min(TenantService.counter)).where(
            TenantService.queue == queue, TenantService.tenant_id.in_(waiting)
        )
    )
    if floor is None:
        floor = session.scalar(
            select(func.max(TenantService.counter)).where(
                TenantService.queue == queue, TenantService.tenant_id != tenant_id
            )
        )
    return floor


def is_backlogged(tenant: Tenant, model) -> bool:
    """Whether the tenant has queued jobs in ``model``'s queue (its counters, kept by the database)."""
    return any(getattr(tenant, QUEUED_COLUMN[m].key) > 0 for m in MODELS_OF_QUEUE[QUEUE_OF[model]])


def lift_on_submit(session: Session, model, tenant_id: str, *, backlogged: bool | None = None) -> None:
    """Call before adding a tenant's new jobs. A tenant with nothing queued is lifted to the floor (``_floor``);
    a backlogged tenant keeps its counter. ``backlogged``: what the caller read of the tenant's queued counter
    (the gateway has the tenant's row from authentication), else it is read here. The gateway runs it in an
    autocommit session of its own, so that the counter's row is not locked across the create's transaction."""
    if backlogged is None:
        row = session.execute(select(Tenant).where(Tenant.id == tenant_id)).scalar_one_or_none()
        backlogged = row is not None and is_backlogged(row, model)
    if backlogged:
        return
    queue = QUEUE_OF[model]
    floor = _floor(session, model, queue, tenant_id)
    _ensure_counter(session, tenant_id, queue, floor or 0.0)
    if floor is not None:
        session.execute(
            update(TenantService)
            .where(TenantService.tenant_id == tenant_id, TenantService.queue == queue, TenantService.counter < floor)
            .values(counter=floor, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def charge(session: Session, model, tenant_id: str, cost: float, weight: float) -> None:
    """Add cost / weight to the tenant's counter (in the caller's transaction)."""
    queue = QUEUE_OF[model]
    _ensure_counter(session, tenant_id, queue, 0.0)
    session.execute(
        update(TenantService)
        .where(TenantService.tenant_id == tenant_id, TenantService.queue == queue)
        .values(counter=TenantService.counter + cost / max(weight, 1e-9), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


@dataclass(frozen=True)
class Candidate:
    job_id: str
    tenant_id: str
    cost: float
    weight: float
    model: type = Generation


def _job_filters(model, filters: Filters) -> tuple:
    return tuple(filters(model) if callable(filters) else filters)


Filters = Sequence | Callable


def pick(
    session: Session,
    models,
    settings: Settings,
    *,
    filters: Filters = (),
    skip_tenants: frozenset[str] = frozenset(),
) -> Candidate | None:
    """The next job to serve: the oldest queued job (matching ``filters``) of the tenant with the smallest
    counter, among tenants below their running-jobs cap. None when nothing is eligible.

    ``models``: a job model, or the models one queue serves (the train queue: ``MODELS_OF_QUEUE["train"]``,
    trainings and evaluations, which share the tenant's counter and running cap); ``filters``: conditions on
    the job's row, or a function of the model that returns them."""
    models = tuple(models) if isinstance(models, tuple | list) else (models,)
    queue = QUEUE_OF[models[0]]
    oldest: dict[str, object] = {}
    for model in models:
        waiting = session.execute(
            select(model.tenant_id, func.min(model.created_at))
            .where(model.status == "queued", *_job_filters(model, filters))
            .group_by(model.tenant_id)
        ).all()
        for tenant_id, created in waiting:
            if tenant_id not in skip_tenants and (tenant_id not in oldest or created < oldest[tenant_id]):
                oldest[tenant_id] = created
    if not oldest:
        return None
    tenants = {
        row.id: row
        for row in session.execute(select(Tenant.id, Tenant.weight, Tenant.limits).where(Tenant.id.in_(oldest)))
    }
    caps = {t: tenant_limits(settings, (tenants[t].limits if t in tenants else None)).max_running_jobs for t in oldest}
    capped = [t for t, cap in caps.items() if cap > 0]
    if capped:
        running: dict[str, int] = {}
        for model in models:
            for tenant_id, count in session.execute(
                select(model.tenant_id, func.count())
                .where(model.status == "running", model.tenant_id.in_(capped))
                .group_by(model.tenant_id)
            ).all():
                running[tenant_id] = running.get(tenant_id, 0) + count
        for tenant_id in capped:
            if running.get(tenant_id, 0) >= caps[tenant_id]:
                del oldest[tenant_id]
        if not oldest:
            return None
    counters = dict(
        session.execute(
            select(TenantService.tenant_id, TenantService.counter).where(
                TenantService.queue == queue, TenantService.tenant_id.in_(oldest)
            )
        ).all()
    )
    floor = min(counters.values(), default=0.0)
    # A tenant without a counter row (jobs from before the scheduler) counts as level with the smallest.
    tenant_id = min(oldest, key=lambda t: (counters.get(t, floor), oldest[t], t))
    jobs = []
    for model in models:
        job = session.execute(
            select(model.id, model.cost, model.created_at)
            .where(model.status == "queued", model.tenant_id == tenant_id, *_job_filters(model, filters))
            .order_by(model.created_at, model.id)
            .limit(1)
        ).first()
        if job is not None:
            jobs.append((job.created_at, job.id, job.cost, model))
    if not jobs:  # taken meanwhile
        return None
    _, job_id, cost, model = min(jobs, key=lambda j: (j[0], j[1]))
    weight = tenants[tenant_id].weight if tenant_id in tenants else 1.0
    return Candidate(job_id, tenant_id, float(cost or 0.0), float(weight or 1.0), model)
