"""Handlers of the local `krona` subcommands (adapter files, counts, models, demo) and of `krona admin`'s keys,
tenants and usage."""

from __future__ import annotations

import argparse
import hashlib
import time
import warnings
from pathlib import Path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def inspect(args: argparse.Namespace) -> int:
    from shared.krona import FORMAT, load_adapter
    from shared.krona.io import read_safetensors
    from shared.krona.lycoris import from_lycoris
    from shared.krona.model import group_factors

    path = Path(args.file)
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") == FORMAT:
        state_dict, config, metadata = load_adapter(path)
        kind = f"native Krona adapter ({FORMAT})"
    elif any(".lokr_w" in k for k in tensors):
        state_dict, config = from_lycoris(tensors), None
        kind = "kohya/LyCORIS LoKr file"
    else:
        raise ValueError(f"{path} is neither a Krona adapter nor a LyCORIS LoKr file")
    pairs = group_factors(state_dict)
    params = sum(a.numel() + b.numel() for a, b in pairs.values())
    a_shapes = sorted({tuple(a.shape) for a, _ in pairs.values()})
    print(f"file:        {path}")
    print(f"format:      {kind}")
    print(f"size:        {path.stat().st_size:,} bytes, sha256 {_sha256(path)}")
    if config is not None:
        print(
            f"config:      a1={config.a1} a2={config.a2} targets={','.join(config.target_modules)} scale={config.scale}"
        )
        print(f"base model:  {metadata.get('base_model') or '(not recorded)'}")
    print(f"layers:      {len(pairs)}, parameters {params:,}, dtype {next(iter(state_dict.values())).dtype}")
    print(f"A shapes:    {', '.join(f'{a1}x{a2}' for a1, a2 in a_shapes)}")
    if args.layers:
        for layer, (a, b) in sorted(pairs.items()):
            d_out, d_in = a.shape[0] * b.shape[0], a.shape[1] * b.shape[1]
            print(f"  {layer}: A {tuple(a.shape)} ⊗ B {tuple(b.shape)} -> {d_out}x{d_in}")
    return 0


def export(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from shared.krona import LyCORISCompatibilityWarning, load_adapter, to_lycoris

    state_dict, _config, metadata = load_adapter(args.file)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LyCORISCompatibilityWarning)
        lyco = to_lycoris(state_dict)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        lyco,
        out,
        metadata={"ss_network_module": "lycoris.kohya", "ss_base_model_version": metadata.get("base_model", "")},
    )
    print(f"wrote {out} ({len(lyco) // 3} LoKr modules, full factors, scale 1)")
    print("loads in ComfyUI, AUTOMATIC1111 and Forge for every factor shape")
    for warning in caught:
        print(f"note: {warning.message}")
    return 0


def import_lycoris(args: argparse.Namespace) -> int:
    from shared.krona import KronaConfig, from_lycoris, save_adapter
    from shared.krona.io import read_safetensors
    from shared.krona.keys import short_name
    from shared.krona.model import group_factors

    tensors, _ = read_safetensors(args.file)
    state_dict = from_lycoris(tensors)
    pairs = group_factors(state_dict)
    a_shapes = [tuple(a.shape) for a, _ in pairs.values()]
    # The file's tensor shapes rule; the config records the most common A shape for information.
    a1, a2 = max(set(a_shapes), key=a_shapes.count)
    targets = sorted({short_name(p) for p in pairs})
    config = KronaConfig(a1=a1, a2=a2, target_modules=tuple(targets))
    out = save_adapter(args.out, state_dict, config, {"base_model": args.base_model, "created_by": "krona import"})
    print(f"wrote {out} ({len(pairs)} layers, A shapes {sorted(set(a_shapes))})")
    return 0


def count(args: argparse.Namespace) -> int:
    from shared.krona import KronaConfig, count_adapter_parameters
    from shared.models import REFERENCE_UNET_CONFIGS, resolve_base_model, unet_config

    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    config = KronaConfig(a1=args.a1, a2=args.a2, target_modules=targets)
    if args.base in REFERENCE_UNET_CONFIGS:
        unet = REFERENCE_UNET_CONFIGS[args.base]
    else:
        unet = unet_config(resolve_base_model(args.base))
    krona = count_adapter_parameters(unet, config)
    from shared.krona import meta_unet, target_layer_shapes

    shapes = target_layer_shapes(meta_unet(unet), config)
    lora4 = sum(4 * (d_out + d_in) for d_out, d_in in shapes.values())
    print(f"base {args.base}: {len(shapes)} target layers")
    print(f"KronA a1={args.a1} a2={args.a2}: {krona:,} parameters ({krona * 4 / 2**20:.1f} MiB in float32)")
    print(f"LoRA rank 4 on the same layers: {lora4:,} parameters ({krona / lora4:.2f}x)")
    return 0


def models(args: argparse.Namespace) -> int:
    from shared.models import resolve_base_model

    print(resolve_base_model(args.name))
    return 0


def demo(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.local:
        from services.cli.demo import run_demo

        run_demo(Path(args.out), args.base)
    else:
        from services.cli.demo_service import run_service_demo

        run_service_demo(Path(args.out))
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0


def train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from workers.training import (
        TrainingCanceled,
        TrainingSpec,
        check_factors_fit_base_model,
        load_components,
        load_subject_images,
    )
    from workers.training import (
        train as run_training,
    )

    # Everything that can be wrong with the job is checked before the model is loaded.
    spec = TrainingSpec(
        instance_prompt=args.prompt,
        steps=args.steps,
        learning_rate=args.lr,
        a1=args.a1,
        a2=args.a2,
        target_modules=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        resolution=args.resolution,
        batch_size=args.batch_size,
        gradient_accumulation=args.grad_accum,
        seed=args.seed,
        random_flip=args.flip,
        prior_preservation=args.prior_preservation,
        class_prompt=args.class_prompt,
        num_class_images=args.num_class_images,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        keep_intermediate=args.keep_intermediate,
        use_8bit_adam=args.use_8bit_adam,
        checkpoint_every=args.checkpoint_every,
        validation_prompt=args.validation_prompt,
        validation_every=args.validation_every,
        method=args.method,
        lora_rank=args.rank,
    )
    images = load_subject_images(args.images)
    n_params = check_factors_fit_base_model(spec, args.base)
    adapter = f"LoRA rank {spec.lora_rank}" if spec.method == "lora" else f"KronA a1={spec.a1} a2={spec.a2}"
    print(f"{len(images)} images, {adapter}: {n_params:,} trainable parameters")
    components = load_components(args.base, device=args.device, mixed_precision=spec.mixed_precision)
    checkpoint_dir = args.resume or args.checkpoint_dir or f"{args.out}.checkpoints"
    total = spec.resolved_steps(components.sdxl)
    bar = tqdm(total=total, unit="step", desc="training", dynamic_ncols=True)

    def on_progress(p) -> None:
        bar.n = p.step
        bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.learning_rate:g}", eta=f"{p.eta_seconds:.0f}s")
        bar.refresh()

    try:
        result = run_training(
            spec,
            components,
            images,
            args.out,
            checkpoint_dir=checkpoint_dir,
            resume=bool(args.resume),
            validation_dir=args.validation_dir,
            on_progress=on_progress,
        )
    except TrainingCanceled as exc:
        bar.close()
        print(f"canceled at step {exc.step}; checkpoint {exc.checkpoint}")
        return 1
    bar.close()
    if result.resumed_from_step:
        print(f"resumed from step {result.resumed_from_step}")
    last = result.losses[-1] if result.losses else float("nan")
    print(f"wrote {result.adapter_path} after {result.steps} steps in {result.seconds:.1f} s (last loss {last:.4f})")
    for image in result.validation_images:
        print(f"validation image {image}")
    return 0


def generate(args: argparse.Namespace) -> int:
    import torch

    from shared.images import save_image
    from shared.krona import load_into_pipeline
    from shared.models import load_pipeline

    if not 0 <= args.scale <= 2:
        raise ValueError(f"--scale must be between 0 and 2, got {args.scale}")
    if not 1 <= args.num_images <= 8:
        raise ValueError(f"--num-images must be between 1 and 8, got {args.num_images}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = load_pipeline(args.base, device=device)
    if args.adapter:
        layers = load_into_pipeline(pipe, args.adapter, scale=args.scale)
        print(f"adapter {args.adapter}: {len(layers)} layers at scale {args.scale}")
    generator = torch.Generator().manual_seed(args.seed)
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        width=args.width,
        height=args.height,
        generator=generator,
        output_type="np",
    ).images
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}")
        save_image(image, path)
        print(f"wrote {path} ({image.shape[1]}x{image.shape[0]})")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from shared.eval.run import METRICS, evaluate, write_report

    if not 0 <= args.scale <= 2:
        raise ValueError(f"--scale must be between 0 and 2, got {args.scale}")
    loss_sets = _heldout_sets(args)  # checked before anything is generated
    report = evaluate(
        base=args.base,
        adapter=args.adapter,
        images_dir=args.images,
        class_noun=args.class_noun,
        out_dir=args.out,
        identifier=args.identifier,
        prompts=args.prompts,
        per_prompt=args.per_prompt,
        adapter_scale=args.scale,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        base_seed=args.seed,
        clip_model=args.clip,
        dino_model=args.dino,
        device=args.device,
    )
    rows = [[r.prompt, *(f"{getattr(r, m):.4f}" for m in METRICS)] for r in report.prompts]
    rows.append(["mean", *(f"{report.scores[m]:.4f}" for m in METRICS)])
    _table(["prompt", "CLIP-I", "CLIP-T", "DINO"], rows)
    if loss_sets:
        from workers.training.heldout import heldout_losses

        report.heldout_loss = heldout_losses(
            args.base,
            args.adapter,
            loss_sets,
            adapter_scale=args.scale,
            resolution=args.resolution,
            seed=args.seed,
            samples=args.loss_samples,
            device=args.device,
        )
        print()
        _table(
            ["held-out denoising loss", "images", "base", "adapter"],
            [
                [name, r["images"], f"{r['base']:.5f}", f"{r['adapter']:.5f}" if "adapter" in r else "-"]
                for name, r in report.heldout_loss.items()
            ],
        )
    json_path = Path(args.json) if args.json else Path(args.out) / "eval.json"
    write_report(report, json_path)
    print(f"wrote {json_path} and {report.grid} ({len(report.prompts)} prompts x {report.per_prompt} images)")
    return 0


def _heldout_sets(args: argparse.Namespace) -> dict:
    """`krona eval`'s held-out loss sets: name -> (decoded images, prompt)."""
    from shared.images import load_subject_images

    sets = {}
    if args.heldout_images:
        prompt = args.instance_prompt or f"a photo of {args.identifier} {args.class_noun}"
        sets["subject (held out)"] = (load_subject_images(args.heldout_images), prompt)
    if args.class_images:
        prompt = args.class_prompt or f"a photo of a {args.class_noun}"
        sets["class"] = (load_subject_images(args.class_images), prompt)
    if sets and not 1 <= args.loss_samples <= 1024:
        raise ValueError(f"--loss-samples must be between 1 and 1024, got {args.loss_samples}")
    return sets


# krona admin: API keys, tenants, usage ------------------------------------------------------------------
# (create-tenant and rotate-webhook-secret live in services/cli/stack.py.) They share the gateway's service
# functions (services/gateway/services/tenants.py), so the command line and the API cannot drift apart.


def admin(args: argparse.Namespace) -> int:
    from services.cli import stack

    handler = _ADMIN_COMMANDS.get(args.admin_command)
    if handler is None:
        return stack.admin(args)
    from shared.db import make_engine, make_session_factory

    settings = stack._settings(args.data_dir)
    engine = make_engine(settings.resolved_database_url)
    try:
        with make_session_factory(engine)() as session:
            return handler(args, settings, session)
    finally:
        engine.dispose()


def _admin_create_admin_key(args, settings, session) -> int:
    from shared.tenants import new_api_key

    key, row = new_api_key(session, None, name=args.name, role="admin")
    session.commit()
    print(f"admin key {row.id} created; the key (shown once; it manages tenants through /v1/tenants):")
    print(key)
    return 0


def _admin_create_key(args, settings, session) -> int:
    from services.gateway.services.tenants import find_tenant
    from shared.tenants import new_api_key

    tenant = find_tenant(session, args.tenant)
    key, row = new_api_key(session, tenant, name=args.name)
    session.commit()
    print(f"API key {row.id} created for tenant {tenant.name}; the key (shown once):")
    print(key)
    return 0


def _admin_list_keys(args, settings, session) -> int:
    from sqlalchemy import select

    from services.gateway.services.tenants import find_tenant
    from shared.db import ApiKey

    tenant = find_tenant(session, args.tenant)
    rows = session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)).all()
    _table(
        ["id", "prefix", "name", "created", "last used", "revoked"],
        [
            [r.id, r.prefix + "…", r.name or "", _when(r.created_at), _when(r.last_used_at), _when(r.revoked_at)]
            for r in rows
        ],
    )
    return 0


def _admin_revoke_key(args, settings, session) -> int:
    from shared.errors import ServiceError
    from services.gateway.services.tenants import revoke_key

    try:
        revoked = revoke_key(session=session, tenant=None, key_id=args.key_id)
    except ServiceError as exc:
        raise ValueError(f"{exc.message} (krona admin list-keys TENANT)") from None
    print(f"API key {args.key_id} {'revoked' if revoked else 'was already revoked'}")
    return 0


def _admin_list_tenants(args, settings, session) -> int:
    from sqlalchemy import select

    from shared.db import Tenant

    rows = session.scalars(select(Tenant).order_by(Tenant.created_at)).all()
    overrides = [", ".join(f"{k}={_number(v)}" for k, v in sorted((r.limits or {}).items())) for r in rows]
    _table(
        ["id", "name", "weight", "limit overrides", "created"],
        [[r.id, r.name, f"{r.weight:g}", o or "-", _when(r.created_at)] for r, o in zip(rows, overrides, strict=True)],
    )
    return 0


LIMIT_NAMES = ("rate_limit_per_second", "rate_limit_burst", "max_queued_jobs", "max_running_jobs",
               "max_generation_compute")  # fmt: skip


def _admin_set_limits(args, settings, session) -> int:
    from pydantic import ValidationError

    from services.gateway.services.tenants import DEFAULT_WEIGHT, apply_limits, find_tenant
    from shared.limits import tenant_limits
    from shared.schemas import TenantUpdate

    tenant = find_tenant(session, args.tenant)
    given = {name: getattr(args, name) for name in LIMIT_NAMES if getattr(args, name) is not None}
    both = sorted(set(args.clear) & ({*given, "weight"} if args.weight is not None else set(given)))
    if both:
        raise ValueError(f"{', '.join(both)}: set and cleared at once; give one")
    if not given and args.weight is None and not args.clear:
        raise ValueError("nothing to change: give --weight, a limit (e.g. --max-queued-jobs 100) or --clear NAME")
    try:  # the API's own checks (ranges), with the API's body model
        TenantUpdate.model_validate({"weight": args.weight, "limits": given}, strict=False)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = "--" + str(error["loc"][-1]).replace("_", "-")
        raise ValueError(f"{field}: {error['msg']}") from None
    if args.weight is not None:
        tenant.weight = args.weight
    elif "weight" in args.clear:
        tenant.weight = DEFAULT_WEIGHT
    apply_limits(tenant, {**given, **{name: None for name in args.clear if name != "weight"}})
    session.commit()
    limits = tenant_limits(settings, tenant.limits)
    print(f"tenant {tenant.name}: weight {tenant.weight:g}")
    _table(
        ["limit", "in effect", "source"],
        [
            [name, _number(getattr(limits, name)), "override" if name in tenant.limits else "default"]
            for name in LIMIT_NAMES
        ],
    )
    return 0


def _admin_delete_tenant(args, settings, session) -> int:
    import sys

    from services.gateway.services.tenants import delete_tenant, find_tenant
    from shared.storage import storage_from_settings

    tenant = find_tenant(session, args.tenant)
    if not args.yes:
        raise ValueError(
            f"this deletes tenant {tenant.name} ({tenant.id}) with all its jobs, adapters, keys, usage and files; "
            "add --yes to do it"
        )
    name, tenant_id = tenant.name, tenant.id
    blobs = delete_tenant(session=session, storage=storage_from_settings(settings), tenant_id=tenant_id)
    if blobs is None:
        print(
            f"krona admin: tenant {name} ({tenant_id}) deleted, but its files under tenants/{tenant_id}/ could not be "
            "removed (storage unreachable); the storage sweep removes them",
            file=sys.stderr,
        )
        return 1
    print(f"tenant {name} ({tenant_id}) deleted with all its rows and {blobs} files")
    return 0


def _admin_usage(args, settings, session) -> int:
    import json

    from sqlalchemy import select

    from services.gateway.services.tenants import find_tenant
    from shared.db import Tenant
    from shared.usage import default_range, parse_day, usage_totals

    tenant_id = find_tenant(session, args.tenant).id if args.tenant else None
    first, last = default_range()
    end = parse_day(args.end, "--end") or last
    start = parse_day(args.start, "--start") or (end - (last - first))
    totals = usage_totals(session, tenant_id, start, end, args.granularity)
    if args.json:
        print(json.dumps({"start": start.isoformat(), "end": end.isoformat(), "data": totals}, indent=2))
        return 0
    names = dict(session.execute(select(Tenant.id, Tenant.name)).all())
    print(f"usage {start} to {end} (UTC), per {args.granularity}:")
    _table(
        ["period", "tenant", "kind", "jobs", "worker s", "images", "steps", "pixels", "devices (s)"],
        [
            [
                e["period"],
                names.get(e["tenant_id"], e["tenant_id"]),
                e["kind"],
                e["jobs"],
                f"{e['worker_seconds']:.1f}",
                e["images"],
                e["steps"],
                f"{e['pixels']:,}",
                ", ".join(f"{d}={s:.1f}" for d, s in e["devices"].items()),
            ]
            for e in totals
        ],
    )
    return 0


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"


def _table(header: list[str], rows: list[list]) -> None:
    """Columns padded to their widest cell; '(none)' under the header when there are no rows."""
    cells = [header, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")


_ADMIN_COMMANDS = {
    "create-admin-key": _admin_create_admin_key,
    "create-key": _admin_create_key,
    "list-keys": _admin_list_keys,
    "revoke-key": _admin_revoke_key,
    "list-tenants": _admin_list_tenants,
    "set-limits": _admin_set_limits,
    "delete-tenant": _admin_delete_tenant,
    "usage": _admin_usage,
}


def admin_sweep(args: argparse.Namespace) -> int:
    """`krona admin sweep`: one retention pass now (workers/retention.py: purge ended trainings' photos, expire
    old generations' images, sweep orphaned blobs); prints the counts. Exit status 1 if a step failed."""
    import json

    from services.cli.stack import _settings
    from workers.retention import run_retention
    from workers.runtime import build_runtime

    counts = run_retention(build_runtime(_settings(args.data_dir)))
    if args.json:
        print(json.dumps(counts, sort_keys=True))
    else:
        width = max(map(len, counts))
        for name, value in counts.items():
            print(f"{name.ljust(width)}  {value}")
    return 1 if counts["errors"] else 0
