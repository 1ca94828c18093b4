"""The resident inference engine: swaps, slots, the tiered cache, mixed batches, merged mode, memory."""

import numpy as np
import pytest
import torch

from shared.krona import KronaConfig, inject_adapter, load_into_pipeline, save_adapter
from shared.krona.bank import KronaBankLinear
from shared.models import load_pipeline
from workers.inference.engine import AdapterShapeError, Engine, Request

RUN = dict(steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def adapter_files(tiny_folders, tmp_path_factory):
    """Four adapters with (64, 8) factors and different random values, as file bytes."""
    from helpers.models import randomize_adapter

    from shared.krona import adapter_state_dict

    pipe = load_pipeline(tiny_folders["tiny-sd"])
    inject_adapter(pipe.unet, KronaConfig())
    files = {}
    folder = tmp_path_factory.mktemp("adapters")
    for i in range(4):
        randomize_adapter(pipe.unet, seed=100 + i, std=0.2)
        path = save_adapter(folder / f"a{i}.safetensors", adapter_state_dict(pipe.unet), KronaConfig())
        files[f"adp_{i}"] = path.read_bytes()
    return files


@pytest.fixture
def engine(tiny_folders, adapter_files):
    pipe = load_pipeline(tiny_folders["tiny-sd"])
    pipe.set_progress_bar_config(disable=True)
    return Engine(pipe, fetch=adapter_files.__getitem__, slots=2, max_batch=8)


def _alone(tiny_folders, adapter_files, tmp_path, adapter_id, seed, scale=1.0):
    """The reference: a plain pipeline with load_into_pipeline, one request."""
    pipe = load_pipeline(tiny_folders["tiny-sd"])
    pipe.set_progress_bar_config(disable=True)
    if adapter_id:
        path = tmp_path / f"{adapter_id}.safetensors"
        path.write_bytes(adapter_files[adapter_id])
        load_into_pipeline(pipe, path, scale=scale)
    g = [torch.Generator().manual_seed(seed)]
    return pipe("a photo of sks dog", num_inference_steps=3, guidance_scale=5.0, generator=g, output_type="np").images[
        0
    ]


def test_engine_equals_the_plain_pipeline_and_swaps_back_exactly(engine, tiny_folders, adapter_files, tmp_path):
    def run(adapter_id):
        return engine.run([Request("a photo of sks dog", adapter_id=adapter_id, seed=3)], **RUN)[0][0]

    def pointers():
        return {p: (layer.bank_a.data_ptr(), layer.bank_b.data_ptr()) for p, layer in engine.layers.items()}

    bank_pointers = pointers()
    modules = len(list(engine.pipe.unet.modules()))
    params = len(list(engine.pipe.unet.parameters()))
    first = run("adp_0")
    np.testing.assert_allclose(first, _alone(tiny_folders, adapter_files, tmp_path, "adp_0", 3), atol=1e-4)
    other = run("adp_1")
    assert np.abs(other - first).max() > 1e-3  # a different adapter really changes the image
    run("adp_2")  # with 2 slots, adp_0 is evicted here
    again = run("adp_0")
    np.testing.assert_allclose(again, first, atol=1e-5)
    assert pointers() == bank_pointers
    assert len(list(engine.pipe.unet.modules())) == modules
    assert len(list(engine.pipe.unet.parameters())) == params
    stats = engine.stats()
    assert stats["storage_fetches"] == 3 and stats["host_hits"] == 1 and stats["device_evictions"] >= 1


def test_mixed_batch_equals_each_request_alone(engine, tiny_folders, adapter_files, tmp_path):
    requests = [
        Request("a photo of sks dog", adapter_id="adp_0", seed=1),
        Request("a photo of sks dog", adapter_id="adp_1", seed=2),
        Request("a photo of sks dog", adapter_id="adp_2", seed=3, adapter_scale=0.5),
        Request("a photo of sks dog", adapter_id=None, seed=4),
    ]
    wide = Engine(load_pipeline(tiny_folders["tiny-sd"]), fetch=adapter_files.__getitem__, slots=4, max_batch=8)
    wide.pipe.set_progress_bar_config(disable=True)
    batch = wide.run(requests, **RUN)
    for request, images in zip(requests, batch, strict=True):
        alone = _alone(tiny_folders, adapter_files, tmp_path, request.adapter_id, request.seed, request.adapter_scale)
        np.testing.assert_allclose(images[0], alone, atol=1e-4)


def test_scale_zero_and_no_adapter_are_the_base_model(engine, tiny_folders, adapter_files, tmp_path):
    base = _alone(tiny_folders, adapter_files, tmp_path, None, 5)
    zero, none = engine.run(
        [
            Request("a photo of sks dog", adapter_id="adp_0", adapter_scale=0.0, seed=5),
            Request("a photo of sks dog", seed=5),
        ],
        **RUN,
    )
    np.testing.assert_allclose(zero[0], base, atol=1e-4)
    np.testing.assert_allclose(none[0], base, atol=1e-4)


def test_merged_mode_and_exact_unmerge(engine, tiny_folders, adapter_files, tmp_path):
    weights = {p: layer.base_layer.weight.detach().clone() for p, layer in engine.layers.items()}
    factored = engine.run([Request("a photo of sks dog", adapter_id="adp_1", seed=7)], **RUN)[0][0]
    engine.merge("adp_1")
    merged = engine.run([Request("a photo of sks dog", adapter_id="adp_1", seed=7)], **RUN)[0][0]
    np.testing.assert_allclose(merged, factored, atol=1e-4)
    with pytest.raises(ValueError, match="merged adapter"):
        engine.run([Request("x", adapter_id="adp_2")], **RUN)
    engine.unmerge()
    for path, layer in engine.layers.items():
        assert torch.equal(layer.base_layer.weight, weights[path])


def test_host_tier_budget_and_refetch(tiny_folders, adapter_files):
    size = len(adapter_files["adp_0"])
    calls = []

    def fetch(adapter_id):
        calls.append(adapter_id)
        return adapter_files[adapter_id]

    engine = Engine(load_pipeline(tiny_folders["tiny-sd"]), fetch=fetch, slots=1, host_budget_bytes=int(size * 1.5))
    for adapter_id in ("adp_0", "adp_1", "adp_0"):
        engine.slot_for(adapter_id)
    # One adapter fits the host budget: adp_0 was evicted by adp_1 and fetched again from storage.
    assert calls == ["adp_0", "adp_1", "adp_0"]
    assert engine.stats()["host_evictions"] == 2 and engine.cache.bytes <= size * 1.5
    assert engine.stats()["device_evictions"] == 2


def test_wrong_shape_adapter_is_refused(tiny_folders, tmp_path):
    pipe = load_pipeline(tiny_folders["tiny-sd"])
    inject_adapter(pipe.unet, KronaConfig(a1=8, a2=8))
    from shared.krona import adapter_state_dict

    path = save_adapter(tmp_path / "w.safetensors", adapter_state_dict(pipe.unet), KronaConfig(a1=8, a2=8))
    engine = Engine(load_pipeline(tiny_folders["tiny-sd"]), fetch=lambda _: path.read_bytes())
    with pytest.raises(AdapterShapeError, match="slots hold A"):
        engine.slot_for("adp_x")
    assert all(isinstance(layer, KronaBankLinear) for layer in engine.layers.values())


def test_500_swaps_keep_memory_flat(tiny_folders, adapter_files):
    import gc

    import psutil

    engine = Engine(load_pipeline(tiny_folders["tiny-sd"]), fetch=adapter_files.__getitem__, slots=2)
    ids = ["adp_0", "adp_1", "adp_2"]  # three adapters in two slots: every call is a real swap
    for adapter_id in ids * 5:
        engine.slot_for(adapter_id)
    gc.collect()
    rss = psutil.Process().memory_info().rss
    for i in range(500):
        engine.slot_for(ids[i % 3])
    gc.collect()
    growth = psutil.Process().memory_info().rss - rss
    assert engine.stats()["device_evictions"] >= 500
    assert growth < 20 * 1024 * 1024, f"RSS grew {growth / 2**20:.1f} MiB over 500 swaps"


def test_worker_serves_queued_requests_of_one_size_in_one_loop(tiny_folders, adapter_files, tmp_path):
    """Three queued generations with three adapters: the first task's loop takes all three (they join it before
    its first step); the others' messages find them done. (Joining mid-loop: tests/test_inference_joining.py.)"""
    from shared.db import Adapter, Generation, upgrade_to_head
    from shared.settings import Settings
    from shared.storage import LocalStorage
    from shared.tenants import create_tenant
    from workers.inference.job import run_generation_job
    from workers.runtime import build_runtime

    settings = Settings(data_dir=tmp_path, base_model="tiny-sd", engine_slots=4)
    upgrade_to_head(settings.resolved_database_url)
    rt = build_runtime(settings, storage=LocalStorage(tmp_path / "blobs"))
    with rt.sessions() as session:
        tenant, _ = create_tenant(session, "batching")
        ids = []
        for i in range(3):
            key = f"tenants/{tenant.id}/adapters/adp_{i}.safetensors"
            rt.storage.put_bytes(key, adapter_files[f"adp_{i}"])
            session.add(Adapter(id=f"adp_{i}", tenant_id=tenant.id, base_model="tiny-sd", config={"a1": 64, "a2": 8},
                                num_parameters=1, size_bytes=1, sha256="x", storage_key=key))  # fmt: skip
            row = Generation(tenant_id=tenant.id, prompt="a photo of sks dog", adapter_id=f"adp_{i}", steps=2,
                             width=64, height=64, seed=i, guidance_scale=5.0)  # fmt: skip
            session.add(row)
            session.flush()
            ids.append(row.id)
        session.commit()
    assert run_generation_job(rt, ids[0]) == "succeeded"
    assert [run_generation_job(rt, job_id) for job_id in ids[1:]] == ["skipped", "skipped"]
    with rt.sessions() as session:
        rows = [session.get(Generation, job_id) for job_id in ids]
        assert all(r.status == "succeeded" and len(r.images) == 1 for r in rows)
        assert all(r.attempts == 1 for r in rows)
    engine = rt.pipelines["engine:tiny-sd"]
    assert engine.stats()["storage_fetches"] == 3


def test_cache_counters_are_exported_as_prometheus_metrics(engine):
    from prometheus_client import CollectorRegistry, generate_latest

    from workers.metrics import EngineCollector

    engine.slot_for("adp_0")
    engine.slot_for("adp_0")
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: [engine]))
    text = generate_latest(registry).decode()
    assert "krona_adapter_cache_storage_fetches_total 1.0" in text
    assert "krona_adapter_cache_device_hits_total 1.0" in text
    assert "krona_adapter_cache_device_resident 1.0" in text


def test_a_compiled_bank_keeps_one_graph_across_slots_and_scales():
    """torch.compile specializes on Python numbers: the routing hands a compiled forward its slot and scale as
    tensors, so another adapter or scale reuses the graph; eager and compiled agree for each of them."""
    from shared.krona.bank import Routing

    torch.manual_seed(0)
    routing = Routing()
    layer = KronaBankLinear(torch.nn.Linear(16, 32), (4, 2), num_slots=4, routing=routing).eval()
    with torch.no_grad():
        layer.bank_a[1:].normal_()
        layer.bank_b[1:].normal_()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=counting)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        for slot, scale in ((1, 1.0), (2, 1.0), (3, 0.5), (1, 0.25), (2, 2.0)):
            routing.uniform(slot, scale)
            expected = layer.base_layer(x) + scale * (x @ torch.kron(layer.bank_a[slot], layer.bank_b[slot]).T)
            torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        assert len(graphs) == 1
        routing.uniform(0, 1.0)  # no adapter: the base layer alone (another mode, one more graph at most)
        torch.testing.assert_close(compiled(x), layer.base_layer(x))
    assert len(graphs) <= 2
    torch._dynamo.reset()
