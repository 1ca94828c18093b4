"""Step-level joining (workers/inference/loop.py): a request that joins a running loop mid-way, among others with
other adapters, scales, step counts, guidance and seeds, gets the images it gets alone (same seed)."""

import numpy as np
import pytest
import torch

from shared.krona import KronaConfig, adapter_state_dict, inject_adapter, load_into_pipeline, save_adapter
from shared.models import load_pipeline
from workers.inference.engine import AdapterShapeError, Engine, Request
from workers.inference.loop import DenoisingLoop

PROMPT = "a photo of sks dog"


def _adapter_files(folder, model_folder, configs):
    """Adapter files (bytes) with non-zero random factors, one per (name, KronaConfig)."""
    from helpers.models import randomize_adapter

    files = {}
    for i, (name, config) in enumerate(configs):
        pipe = load_pipeline(model_folder)
        inject_adapter(pipe.unet, config)
        randomize_adapter(pipe.unet, seed=300 + i, std=0.2)
        path = save_adapter(folder / f"{name}.safetensors", adapter_state_dict(pipe.unet), config)
        files[name] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def sd_files(tiny_folders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loop-adapters")
    configs = [(f"adp_{i}", KronaConfig()) for i in range(3)]
    configs.append(("adp_qv", KronaConfig(target_modules=("to_q", "to_v"))))  # a subset of the engine's layers
    configs.append(("adp_small", KronaConfig(a1=8, a2=8)))  # another A shape: refused
    return _adapter_files(folder, tiny_folders["tiny-sd"], configs)


def _pipeline(folder, scheduler: str | None = None):
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        import diffusers

        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe


def _alone(folder, files, tmp_path, request: Request, steps, guidance, scheduler=None, size=64):
    """The reference: the plain pipeline with the adapter loaded the ordinary way, the request alone."""
    pipe = _pipeline(folder, scheduler)
    if request.adapter_id:
        path = tmp_path / f"{request.adapter_id}.safetensors"
        path.write_bytes(files[request.adapter_id])
        load_into_pipeline(pipe, path, scale=request.adapter_scale)
    generators = [torch.Generator().manual_seed(request.seed + k) for k in range(request.num_images)]
    return pipe(
        [request.prompt] * request.num_images,
        negative_prompt=[request.negative_prompt] * request.num_images if request.negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generators,
        width=size,
        height=size,
        output_type="np",
    ).images


def _run(loop: DenoisingLoop, arrivals: dict[int, list]) -> tuple[dict, list[int]]:
    """Run the loop, joining ``arrivals[k]`` ((key, request, steps, guidance) tuples) before its k-th step; the
    images of each key, and how many requests took part in each step."""
    results, sizes, step = {}, [], 0
    while loop.active or any(k >= step for k in arrivals):
        for key, request, steps, guidance in arrivals.get(step, []):
            loop.join(key, request, steps=steps, guidance_scale=guidance)
        sizes.append(len(loop.active))
        for finished in loop.step():
            results[finished.key] = loop.decode(finished)
        step += 1
    return results, sizes


# (key, request, steps, guidance), joining before the step given: different adapters, scales, seeds, step
# counts, guidance (1.0: no unconditional rows), negative prompts and image counts, arriving mid-loop.
ARRIVALS = {
    0: [("a", Request(PROMPT, adapter_id="adp_0", seed=1), 6, 5.0)],
    1: [("b", Request(PROMPT, adapter_id="adp_1", seed=2, adapter_scale=0.5, num_images=2), 4, 7.5)],
    2: [
        ("c", Request("a red car", seed=3, negative_prompt="blurry"), 3, 3.0),
        ("d", Request(PROMPT, adapter_id="adp_2", seed=4), 5, 1.0),
    ],
    4: [("e", Request(PROMPT, adapter_id="adp_0", seed=5), 2, 5.0)],
}


@pytest.mark.parametrize("scheduler", [None, "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_a_request_joining_mid_loop_gets_what_it_gets_alone(tiny_folders, sd_files, tmp_path, scheduler):
    """DDIM (the model's own), Euler ancestral (noise from each request's generators in every step, a step
    index per scheduler) and DPM-Solver++ (a history of model outputs per scheduler)."""
    folder = tiny_folders["tiny-sd"]
    engine = Engine(_pipeline(folder, scheduler), fetch=sd_files.__getitem__, slots=3, max_batch=8)
    loop = DenoisingLoop(engine, width=64, height=64)
    results, sizes = _run(loop, ARRIVALS)
    assert max(sizes) == 5 and sizes[0] == 1  # they really ran together, joined at different steps
    for joins in ARRIVALS.values():
        for key, request, steps, guidance in joins:
            alone = _alone(folder, sd_files, tmp_path, request, steps, guidance, scheduler)
            assert len(results[key]) == request.num_images
            np.testing.assert_allclose(np.stack(results[key]), alone, atol=1e-4, err_msg=key)
    assert not loop.active and loop.images == 0


def test_different_adapters_really_change_the_images(tiny_folders, sd_files):
    """The equality above would prove little if the adapters did nothing."""
    engine = Engine(_pipeline(tiny_folders["tiny-sd"]), fetch=sd_files.__getitem__, slots=3)
    loop = DenoisingLoop(engine, width=64, height=64)
    arrivals = {0: [(a, Request(PROMPT, adapter_id=a, seed=1), 3, 5.0) for a in ("adp_0", "adp_1", None)]}
    results, _ = _run(loop, arrivals)
    assert np.abs(results["adp_0"][0] - results["adp_1"][0]).max() > 1e-3
    assert np.abs(results["adp_0"][0] - results[None][0]).max() > 1e-3


def test_sdxl_requests_join_mid_loop_with_their_own_pooled_text_and_size_ids(tiny_folders, tmp_path_factory, tmp_path):
    folder = tiny_folders["tiny-sdxl"]
    files = _adapter_files(tmp_path_factory.mktemp("sdxl-adapters"), folder, [("x_0", KronaConfig()),
                                                                            ("x_1", KronaConfig())])  # fmt: skip
    engine = Engine(_pipeline(folder), fetch=files.__getitem__, slots=2)
    loop = DenoisingLoop(engine, width=64, height=64)
    arrivals = {
        0: [("a", Request(PROMPT, adapter_id="x_0", seed=1), 4, 5.0)],
        2: [("b", Request(PROMPT, adapter_id="x_1", seed=2, negative_prompt="ugly"), 3, 6.0)],
        3: [("c", Request("a cat", seed=3), 2, 1.0)],
    }
    results, sizes = _run(loop, arrivals)
    assert max(sizes) == 3
    for joins in arrivals.values():
        for key, request, steps, guidance in joins:
            alone = _alone(folder, files, tmp_path, request, steps, guidance)
            np.testing.assert_allclose(np.stack(results[key]), alone, atol=1e-4, err_msg=key)


def test_an_adapter_on_a_subset_of_the_layers_is_served(tiny_folders, sd_files, tmp_path):
    """A training with target_modules ["to_q", "to_v"]: the other layers' slots hold zeros (a no-op)."""
    folder = tiny_folders["tiny-sd"]
    engine = Engine(_pipeline(folder), fetch=sd_files.__getitem__, slots=2)
    request = Request(PROMPT, adapter_id="adp_qv", seed=7)
    image = engine.run([request], steps=3, guidance_scale=5.0, width=64, height=64)[0]
    np.testing.assert_allclose(np.stack(image), _alone(folder, sd_files, tmp_path, request, 3, 5.0), atol=1e-4)
    base = engine.run([Request(PROMPT, seed=7)], steps=3, guidance_scale=5.0, width=64, height=64)[0]
    assert np.abs(image[0] - base[0]).max() > 1e-3
    with pytest.raises(AdapterShapeError, match="slots hold A"):
        engine.slot_for("adp_small")


def test_a_request_that_cannot_join_leaves_the_loop_as_it_was(tiny_folders, sd_files, tmp_path):
    folder = tiny_folders["tiny-sd"]
    files = dict(sd_files, adp_bad=b"not a safetensors file")
    engine = Engine(_pipeline(folder), fetch=files.__getitem__, slots=2)
    loop = DenoisingLoop(engine, width=64, height=64, max_images=3)
    good = Request(PROMPT, adapter_id="adp_0", seed=1)
    loop.join("good", good, steps=4, guidance_scale=5.0)
    loop.step()
    for bad in ("adp_bad", "adp_small"):
        with pytest.raises(AdapterShapeError):
            loop.join(bad, Request(PROMPT, adapter_id=bad), steps=4, guidance_scale=5.0)
    with pytest.raises(ValueError, match="do not fit"):
        loop.join("big", Request(PROMPT, num_images=3), steps=4, guidance_scale=5.0)
    assert [d.key for d in loop.active] == ["good"]
    finished = []
    while loop.active:
        finished += loop.step()
    np.testing.assert_allclose(
        np.stack(loop.decode(finished[0])), _alone(folder, sd_files, tmp_path, good, 4, 5.0), atol=1e-4
    )


def test_running_requests_keep_their_slots(tiny_folders, sd_files):
    """Two slots, two running adapters: a third adapter cannot join until one of them leaves."""
    engine = Engine(_pipeline(tiny_folders["tiny-sd"]), fetch=sd_files.__getitem__, slots=2)
    loop = DenoisingLoop(engine, width=64, height=64)
    loop.join("a", Request(PROMPT, adapter_id="adp_0"), steps=2, guidance_scale=5.0)
    loop.join("b", Request(PROMPT, adapter_id="adp_1"), steps=3, guidance_scale=5.0)
    assert not loop.can_host("adp_2") and loop.can_host("adp_0") and loop.can_host(None)
    loop.step()
    assert [d.key for d in loop.step()] == ["a"]
    assert loop.can_host("adp_2")
    loop.join("c", Request(PROMPT, adapter_id="adp_2"), steps=1, guidance_scale=5.0)
    assert {d.key: d.slot for d in loop.active}["b"] != {d.key: d.slot for d in loop.active}["c"]
    assert loop.leave("b").key == "b" and [d.key for d in loop.step()] == ["c"]


def test_loops_of_two_sizes_share_the_slots_and_the_bound_on_images(tiny_folders, sd_files, tmp_path):
    """A group's 64x64 and 96x96 loops: a slot that one loop's request uses is pinned for the other, the bound on
    images is the group's, and each request still gets its images alone."""
    from workers.inference.loop import LoopGroup

    folder = tiny_folders["tiny-sd"]
    engine = Engine(_pipeline(folder), fetch=sd_files.__getitem__, slots=2)
    group = LoopGroup(engine, max_images=3)
    small, large = group.loop(64, 64), group.loop(96, 96)
    a = Request(PROMPT, adapter_id="adp_0", seed=3)
    b = Request(PROMPT, adapter_id="adp_1", seed=4, num_images=2)
    small.join("a", a, steps=2, guidance_scale=5.0)
    large.join("b", b, steps=3, guidance_scale=5.0)
    slots = {d.slot for d in [*small.active, *large.active]}
    assert group.room == 0 and small.room == 0 and len(slots) == 2
    assert group.pinned() == small.pinned() == large.pinned() == slots
    assert not small.can_host("adp_2") and not large.can_host("adp_2")  # both slots are in use, across loops
    with pytest.raises(ValueError, match="do not fit"):
        small.join("c", Request(PROMPT), steps=2, guidance_scale=5.0)
    finished = {}
    while group.active:
        for loop in group.running():
            finished.update({d.key: loop.decode(d) for d in loop.step()})
    assert group.running() == [] and group.room == 3
    for key, request, steps, size in (("a", a, 2, 64), ("b", b, 3, 96)):
        want = _alone(folder, sd_files, tmp_path, request, steps, 5.0, size=size)
        np.testing.assert_allclose(np.stack(finished[key]), want, atol=1e-4)


def test_each_request_is_charged_its_share_of_the_steps_it_took_part_in(tiny_folders, sd_files):
    engine = Engine(_pipeline(tiny_folders["tiny-sd"]), fetch=sd_files.__getitem__, slots=2)
    loop = DenoisingLoop(engine, width=64, height=64)
    cfg = loop.join("cfg", Request(PROMPT, num_images=2), steps=2, guidance_scale=5.0)  # 4 UNet rows
    plain = loop.join("plain", Request(PROMPT), steps=2, guidance_scale=1.0)  # 1 UNet row
    assert (cfg.rows, plain.rows) == (4, 1)
    loop.step()
    loop.step()
    assert cfg.unet_seconds == pytest.approx(4 * plain.unet_seconds)


def test_the_mixed_sizes_benchmark_serves_both_sizes_in_one_task(tmp_path, model_cache):
    """benchmarks/mixed_sizes.py runs (it cannot rot), and on the worker's real path a request of another size
    is served beside the running loop, in the same task (before the loop per size it took three)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "mixed_sizes.json"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "mixed_sizes.py"), "--backlog", "2", "--rounds", "1",
         "--json", str(out)],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["statuses"] == ["succeeded"] and run["tasks"] == 1
