"""Handlers of the local `krona` subcommands (adapter files, counts, models, demo)."""

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
    from shared.krona.model import group_factors, short_name

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
    from services.cli.demo import run_demo

    start = time.perf_counter()
    run_demo(Path(args.out), args.base)
    print(f"demo finished in {time.perf_counter() - start:.1f} s")
    return 0
