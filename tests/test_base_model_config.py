"""The gateway reads the base model's UNet config without building the model (and without torch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from shared.models.shapes import attention_projection_shapes

REPO_ROOT = Path(__file__).resolve().parents[1]

# In a fresh interpreter, on an empty model cache: what the gateway derives from each built-in model's config.
GATEWAY_VIEW = """
import json, sys
from services.gateway.context import AppContext
from shared.settings import Settings
out = {}
for name in ("tiny-sd", "tiny-sdxl"):
    context = AppContext(settings=Settings(base_model=name), engine=None, sessions=None, storage=None, enqueuer=None)
    shapes = context.base_model_shapes()
    out[name] = {"shapes": {k: list(v) for k, v in shapes.items()}, "native_size": context.native_size()}
out["heavy"] = sorted({"torch", "diffusers", "transformers"} & set(sys.modules))
print(json.dumps(out))
"""


def test_gateway_reads_an_unbuilt_tiny_models_config_without_torch_or_a_build(tmp_path, tiny_folders):
    empty_cache = tmp_path / "cache"
    env = {**os.environ, "KRONA_MODEL_CACHE": str(empty_cache), "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", GATEWAY_VIEW], capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True
    )
    view = json.loads(out.stdout)
    assert view["heavy"] == []
    assert not empty_cache.exists() or not any(empty_cache.iterdir())  # nothing was built
    for name, folder in tiny_folders.items():
        # The same shapes and image size as the config.json of the model a worker builds and loads.
        built = json.loads((folder / "unet" / "config.json").read_text())
        expected = {k: list(v) for k, v in attention_projection_shapes(built).items()}
        assert expected and view[name]["shapes"] == expected, name
        assert view[name]["native_size"] == built["sample_size"] * 8 == 64


def test_unet_config_of_a_built_tiny_model_is_its_file(tiny_folders):
    from shared.models import unet_config

    for name, folder in tiny_folders.items():
        assert unet_config(name) == json.loads((folder / "unet" / "config.json").read_text())
