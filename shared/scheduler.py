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

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, exists, func, literal_column, or_, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session, aliased
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import BindParameter

from shared.db import Evaluation, Generation, JobStatus, Tenant, TenantService, Training, utcnow
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
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
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

# Zero as a literal, not a bound parameter: a planner matches a partial index's predicate ("> 0") only against
# constants, and psycopg's prepared statements would hide a parameter's value.
_ZERO = literal_column("0")


def _waiting(queue: str, tenant=Tenant):
    """Tenants with queued jobs in ``queue``, from the triggers' counters: the predicate of the partial indexes of
    migrations/versions/0010_*.py, so that finding them reads only the waiting tenants, not every tenant."""
    return or_(*(getattr(tenant, QUEUED_COLUMN[m].key) > _ZERO for m in MODELS_OF_QUEUE[queue]))


def _floor(session: Session, model, queue: str, tenant_id: str) -> float | None:
    """Where a tenant that had nothing queued starts: the smallest counter among the other tenants with queued
    jobs; when none wait, the largest counter of the queue (S-LoRA's "last client to leave": whoever was
    served last is level with the newcomer). None when the queue has no counters yet."""
    waiting = select(Tenant.id).where(_waiting(queue), Tenant.id != tenant_id)
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
    """Add cost / weight to the tenant's counter (in the caller's transaction). A tenant without a counter (its
    jobs were added without ``lift_on_submit``: from before the scheduler, or by hand) gets one at the floor
    first, so that it is level with the waiting tenants after its first job, not a whole backlog behind at 0."""
    queue = QUEUE_OF[model]
    add = (
        update(TenantService)
        .where(TenantService.tenant_id == tenant_id, TenantService.queue == queue)
        .values(counter=TenantService.counter + cost / max(weight, 1e-9), updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if session.execute(add).rowcount == 0:
        _ensure_counter(session, tenant_id, queue, _floor(session, model, queue, tenant_id) or 0.0)
        session.execute(add)


@dataclass(frozen=True)
class Candidate:
    job_id: str
    tenant_id: str
    cost: float
    weight: float
    model: type = Generation


Filters = Sequence | Callable


def _job_filters(model, filters: Filters) -> tuple:
    return tuple(filters(model) if callable(filters) else filters)


# Tenants are read in fair order a window at a time, each with its oldest matching jobs, in one statement. The
# first window almost always holds the answer (its first tenant, unless a filter or the running cap rules it out);
# each next window is this many times larger.
_FIRST_WINDOW = 4
_WINDOW_GROWTH = 8
# A literal, for the partial index of queued generations' sizes (migration 0010), like _ZERO.
_QUEUED = literal_column("'queued'")


def _in_fair_order(tenant_ids, queue: str):
    """The tenants of the subquery column ``tenant_ids`` in fair order, with their weights and limits: smallest
    counter first, then the one that reached it first (the counter's ``updated_at``), then by id; a tenant
    without a counter first of all. Bound parameters: the window's ``size`` and ``offset``. Returns the statement
    and its inner ``tenant_id`` column, which ``_with_oldest_jobs`` correlates to.

    The order is found from the tenants' ids and counters alone; the tenants' rows, which every queued-counter
    update rewrites and so spread over many pages, are read only for the window's few tenants (sorting them all
    in one join read the whole table: 5.6 ms instead of 1.0 ms on PostgreSQL after 100,000 inserts)."""
    in_order = (
        select(tenant_ids.label("tenant_id"), TenantService.counter, TenantService.updated_at)
        .outerjoin(TenantService, (TenantService.tenant_id == tenant_ids) & (TenantService.queue == queue))
        .order_by(TenantService.counter.asc().nulls_first(), TenantService.updated_at, tenant_ids)
        .limit(bindparam("size"))
        .offset(bindparam("offset"))
        .subquery("in_order")
    )
    statement = (
        select(in_order.c.tenant_id, Tenant.weight, Tenant.limits, in_order.c.counter, in_order.c.updated_at)
        .join_from(in_order, Tenant, Tenant.id == in_order.c.tenant_id)
        .order_by(in_order.c.counter.asc().nulls_first(), in_order.c.updated_at, in_order.c.tenant_id)
    )
    return statement, in_order.c.tenant_id


@lru_cache(maxsize=64)
def _waiting_in_order(queue: str, skip_tenants: frozenset[str] = frozenset()):
    """The waiting tenants of ``queue`` (the partial index of migration 0010: an index-only scan) in fair order.
    Cached: building the statement costs more Python than running it."""
    waiting = aliased(Tenant, name="waiting")
    ids = select(waiting.id).where(_waiting(queue, waiting))
    if skip_tenants:
        ids = ids.where(waiting.id.not_in(skip_tenants))
    return _in_fair_order(ids.subquery("waiting_ids").c.id, queue)


def _matching_in_order(
    models: tuple, job_filters: dict, queue: str, skip_tenants: frozenset[str], *, trust_counters: bool = True
):
    """The waiting tenants that have a queued job matching the filters, in fair order. One statement; the
    planner picks how to find them from the statistics: a probe per waiting tenant in fair order when many
    match, or a read of the matching jobs when few do (through the partial index of queued generations' sizes,
    migration 0010, when the filters fix width and height; it also serves the probes). ``trust_counters=False``:
    every tenant with a matching job, whatever its queued counters say."""
    waiting = aliased(Tenant, name="waiting")
    matching = or_(
        *(
            exists().where(model.tenant_id == waiting.id, model.status == _QUEUED, *job_filters[model])
            for model in models
        )
    )
    ids = select(waiting.id).where(matching)
    if trust_counters:
        ids = ids.where(_waiting(queue, waiting))
    if skip_tenants:
        ids = ids.where(waiting.id.not_in(skip_tenants))
    return _in_fair_order(ids.subquery("matching_ids").c.id, queue)


def _oldest(model, tenant_id, filters: tuple):
    """The tenant's oldest queued job of ``model`` matching ``filters`` (the index (status, tenant_id,
    created_at) finds it); ``tenant_id`` a value or a column of an enclosing query."""
    return (
        select(model.id, model.cost, model.created_at)
        .where(model.tenant_id == tenant_id, model.status == JobStatus.QUEUED, *filters)
        .order_by(model.created_at, model.id)
        .limit(1)
    )


_JOB_COLUMNS = ("id", "cost", "created_at")


def _with_oldest_jobs(in_fair_order: tuple, models: tuple, job_filters: dict):
    """A window statement of ``_in_fair_order`` with, as more columns, each tenant's oldest matching queued job of
    every model (id, cost, created_at): subqueries the database runs for the window's few rows only, in the same
    round trip (on a loaded machine a round trip costs more than the reads)."""
    statement, tenant_id = in_fair_order
    return statement.add_columns(
        *(
            _oldest(model, tenant_id, job_filters[model]).with_only_columns(getattr(model, column)).scalar_subquery()
            for model in models
            for column in _JOB_COLUMNS
        )
    )


# Window statements by queue, models, skipped tenants and the shape of the filters (their values are parameters):
# building the statement costs several times what running it does.
_WINDOWS: OrderedDict[tuple, object] = OrderedDict()
_WINDOWS_KEPT = 256


def _window(
    queue: str, models: tuple, skip_tenants: frozenset[str], job_filters: dict, matching: bool, trust_counters: bool
) -> tuple:
    """(statement, parameters): tenants in fair order with their oldest matching jobs (``_waiting_in_order``, or
    ``_matching_in_order`` when ``matching``), built once per shape of the filters; this call's filter values go
    in as parameters (``filter_<n>``)."""

    def build(filters: dict):
        if matching:
            tenants = _matching_in_order(models, filters, queue, skip_tenants, trust_counters=trust_counters)
        else:
            tenants = _waiting_in_order(queue, skip_tenants)
        return _with_oldest_jobs(tenants, models, filters)

    keys, found = [], []
    for model in models:
        for condition in job_filters[model]:
            cache_key = condition._generate_cache_key()
            if cache_key is None:  # a construct SQLAlchemy cannot cache: build the statement every time
                return build(job_filters), {}
            keys.append(cache_key.key)
            found.extend(cache_key.bindparams)
    names: dict[int, str] = {}
    values: dict[str, object] = {}
    for parameter in found:
        if id(parameter) not in names:
            names[id(parameter)] = name = f"filter_{len(names)}"
            values[name] = parameter.effective_value
    key = (queue, models, skip_tenants, matching, trust_counters, tuple(keys))
    statement = _WINDOWS.get(key)
    if statement is None:

        def named(element):
            if isinstance(element, BindParameter) and id(element) in names:
                return bindparam(
                    names[id(element)], type_=element.type, expanding=element.expanding,
                    literal_execute=element.literal_execute,
                )  # fmt: skip
            return None

        statement = build(
            {model: tuple(visitors.replacement_traverse(c, {}, named) for c in job_filters[model]) for model in models}
        )
        _WINDOWS[key] = statement
        while len(_WINDOWS) > _WINDOWS_KEPT:
            _WINDOWS.popitem(last=False)
    return statement, values


def _running(session: Session, models: tuple, tenant_ids: list[str]) -> dict[str, int]:
    """Running jobs of these tenants across the queue's models."""
    running: dict[str, int] = {}
    for model in models:
        for tenant_id, count in session.execute(
            select(model.tenant_id, func.count())
            .where(model.status == JobStatus.RUNNING, model.tenant_id.in_(tenant_ids))
            .group_by(model.tenant_id)
        ).all():
            running[tenant_id] = running.get(tenant_id, 0) + count
    return running


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
    the job's row, or a function of the model that returns them.

    Tenants at the same counter go in the order they reached it (the counter's ``updated_at``: the one served
    or lifted longest ago first), then by id. A tenant with queued jobs but no counter (jobs added without
    ``lift_on_submit``) goes first; its first charge sets its counter at the floor (``charge``).

    What it reads does not grow with the queue, and usually it is one statement: the first few waiting tenants
    in fair order, from the partial index of waiting tenants (``tenants.queued_*`` > 0, kept by the triggers)
    and the counters, with their weights, limits and oldest matching queued job of each model (one index read
    each, for those few only). Running jobs are counted only when one of them has a running cap. If the first
    few are all at their cap, larger windows are read the same way. If one of them has no job matching the
    filters (the gatherer's compatibility filters), the tenants that have one are found from the jobs' side
    instead, in one statement that the planner answers by probing the waiting tenants in order or by reading
    the matching jobs (the partial index of queued generations' sizes serves both when the filters fix width
    and height). The jobs' side is also asked when no tenant waits by the counters: an empty queue costs one
    more short read, and counters out of step with the jobs (a migration that lost the triggers, say) slow the
    pick down instead of stopping the queue.
    """
    models = tuple(models) if isinstance(models, tuple | list) else (models,)
    queue = QUEUE_OF[models[0]]
    job_filters = {model: _job_filters(model, filters) for model in models}
    skip_tenants = frozenset(skip_tenants)
    trust_counters = True
    statement, values = _window(queue, models, skip_tenants, job_filters, False, True)
    size, offset = _FIRST_WINDOW, 0
    while True:
        rows = session.execute(statement, {"size": size, "offset": offset, **values}).all()
        if not rows and offset == 0:
            # No tenant waits by the counters: the queue is empty, unless the counters are out of step.
            if not _any_queued(session, models, job_filters):
                return None
            trust_counters = False
            break
        candidate, unmatched = _first_eligible(session, models, settings, rows)
        if candidate is not None or len(rows) < size:
            return candidate
        if unmatched:
            break
        offset += size
        size *= _WINDOW_GROWTH
    statement, values = _window(queue, models, skip_tenants, job_filters, True, trust_counters)
    size, offset = _FIRST_WINDOW * _WINDOW_GROWTH, 0
    while True:
        rows = session.execute(statement, {"size": size, "offset": offset, **values}).all()
        candidate, _ = _first_eligible(session, models, settings, rows)
        if candidate is not None or len(rows) < size:
            return candidate
        offset += size
        size *= _WINDOW_GROWTH


def _any_queued(session: Session, models: tuple, job_filters: dict) -> bool:
    """Whether any queued job matches the filters (one index read per model when the queue is empty)."""
    return any(
        session.execute(select(model.id).where(model.status == JobStatus.QUEUED, *job_filters[model]).limit(1)).first()
        for model in models
    )


def _first_eligible(session: Session, models: tuple, settings: Settings, rows: list) -> tuple[Candidate | None, bool]:
    """The first of ``rows`` (tenants in fair order, with their oldest matching jobs) below its running-jobs cap
    that has a matching job, as a Candidate; and whether a tenant below its cap was passed over for having no
    matching job."""
    caps = {row.tenant_id: tenant_limits(settings, row.limits).max_running_jobs for row in rows}
    running: dict[str, int] | None = None
    unmatched = False
    for row in rows:
        cap = caps[row.tenant_id]
        if cap > 0:
            if running is None:  # once per window, for its capped tenants
                running = _running(session, models, [t for t, c in caps.items() if c > 0])
            if running.get(row.tenant_id, 0) >= cap:
                continue
        jobs = _jobs_of_row(models, row)
        if not jobs:
            unmatched = True
            continue
        _, job_id, cost, model = min(jobs, key=lambda job: (job[0], job[1]))
        return Candidate(job_id, row.tenant_id, float(cost or 0.0), float(row.weight or 1.0), model), unmatched
    return None, unmatched


def _jobs_of_row(models: tuple, row) -> list[tuple]:
    """(created_at, id, cost, model) of each model's oldest matching job in a window row that has one."""
    values = row[5:]  # after tenant_id, weight, limits, counter, updated_at: id, cost, created_at per model
    width = len(_JOB_COLUMNS)
    return [
        (values[width * i + 2], values[width * i], values[width * i + 1], model)
        for i, model in enumerate(models)
        if values[width * i] is not None
    ]
