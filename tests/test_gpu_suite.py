"""benchmarks/gpu_suite.py, the GPU checks in one command (issue 24, item 4), cannot rot: its --dry-run runs every
section on the CPU with tiny shapes and models and writes the JSON a GPU run writes, each section with numbers."""

from __future__ import annotations

import json
import numbers
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "adapter_ops",
    "adapter_overhead",
    "train_step_sdxl",
    "engine_compile",
    "swap_h2d",
    "continuous_batching",
    "evaluation_memory",
)


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, numbers.Real):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def test_the_dry_run_writes_every_section_with_numbers(tmp_path, model_cache):
    out = tmp_path / "gpu_suite.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["dry_run"] is True and document["meaningful"] is False
    assert set(document["sections"]) == set(SECTIONS)
    for name, section in document["sections"].items():
        if name == "continuous_batching" and section["status"] in ("not available", "timed out"):
            continue  # another engineer's script: absent, or slower than the dry run allows on a loaded machine
        assert section["status"] == "ok", (name, section)
        assert _numbers({k: v for k, v in section.items() if k != "section_seconds"}), name

    sections = document["sections"]
    assert {(row["mode"], row["tokens"]) for row in sections["adapter_overhead"]["rows"]} == {
        (mode, tokens) for mode in ("train", "inference") for tokens in (1, 77)
    }
    for row in sections["adapter_overhead"]["rows"]:
        expected = {"krona_autograd"} if row["mode"] == "train" else {"krona_function"}
        assert {"krona", "krona_compiled", "lora_r4", *expected} <= set(row["ms"])
        assert all(error < 2e-2 for error in row["max_rel_err_vs_krona"].values())  # bfloat16
    assert {row["method"] for row in sections["train_step_sdxl"]["rows"]} == {"krona", "lora_r4"}
    engine = sections["engine_compile"]
    assert engine["swaps"] == 8 and engine["graphs_first_call"] >= 1
    # A swap or another scale is new tensor values, not a new graph: only the mixed batch (another mode) compiles.
    assert [event["kind"] for event in engine["recompile_events"]] == ["mixed batch"], engine["recompile_events"]
    assert sections["swap_h2d"]["tiny"]["swaps"] == 50
    evaluation = sections["evaluation_memory"]
    assert set(evaluation["scores"]) == {"clip_i", "clip_t", "dino"}
