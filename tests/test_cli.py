"""The `krona` command as a user runs it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.models import build_tiny_unet, randomize_adapter

from services.cli.main import main
from shared.krona import KronaConfig, adapter_state_dict, load_adapter, save_adapter

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_help_imports_no_torch():
    code = "import sys; from services.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "False"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "--help"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert result.returncode == 0
    for command in ("demo", "inspect", "export", "import", "count", "models"):
        assert command in result.stdout


@pytest.fixture
def adapter_file(tmp_path):
    unet = build_tiny_unet()
    cfg = KronaConfig(a1=8, a2=8)
    inject_adapter_and_randomize(unet, cfg)
    return save_adapter(tmp_path / "a.safetensors", adapter_state_dict(unet), cfg, {"base_model": "tiny-sd"})


def inject_adapter_and_randomize(unet, cfg):
    from shared.krona import inject_adapter

    inject_adapter(unet, cfg)
    randomize_adapter(unet)


def test_inspect_export_import_round_trip(adapter_file, tmp_path, capsys):
    assert main(["inspect", str(adapter_file), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "native Krona adapter" in out and "a1=8 a2=8" in out and "base model:  tiny-sd" in out
    assert "attn1.to_q: A (8, 8)" in out

    lyco = tmp_path / "lyco.safetensors"
    assert main(["export", str(adapter_file), "-o", str(lyco)]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI" in out and "note:" not in out  # 8x8 factors: the LyCORIS library can rebuild them too

    back = tmp_path / "back.safetensors"
    assert main(["import", str(lyco), "-o", str(back), "--base-model", "tiny-sd"]) == 0
    original, _, _ = load_adapter(adapter_file)
    imported, cfg, meta = load_adapter(back)
    assert (cfg.a1, cfg.a2) == (8, 8) and meta["base_model"] == "tiny-sd"
    assert set(cfg.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    assert imported.keys() == original.keys()
    assert all((imported[k] == original[k]).all() for k in original)


def test_export_notes_lycoris_library_limit_for_paper_factors(tmp_path, capsys):
    unet = build_tiny_unet()
    inject_adapter_and_randomize(unet, KronaConfig())
    path = save_adapter(tmp_path / "p.safetensors", adapter_state_dict(unet), KronaConfig())
    assert main(["export", str(path), "-o", str(tmp_path / "l.safetensors")]) == 0
    assert "note:" in capsys.readouterr().out


def test_count_matches_the_paper(capsys):
    assert main(["count", "--base", "sdxl", "--a1", "64", "--a2", "4"]) == 0
    out = capsys.readouterr().out
    assert "3,874,560 parameters" in out and "5,806,080 parameters" in out


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a tensor file")
    assert main(["inspect", str(bad)]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
    assert main(["count", "--base", "sdxl", "--a1", "48"]) == 2
    assert "a1=48 does not divide" in capsys.readouterr().err
    assert main(["count", "--base", "no-such-model"]) == 2
    assert "tiny-sd" in capsys.readouterr().err


def test_demo_runs_end_to_end(model_cache, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "demo", "--local", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO_ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[6/6] merged == factored" in result.stdout
    for name in ("base.png", "adapted.png", "adapter.safetensors", "adapter_lycoris.safetensors"):
        assert (tmp_path / "demo" / name).stat().st_size > 0
