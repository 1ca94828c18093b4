"""Deployment files, validated statically (there is no Docker engine or cluster here)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ("cpu", "gpu")
# Read by code outside Settings: the tiny-model cache (shared/models/tiny.py); the image tag (compose only).
OTHER_VARIABLES = {"KRONA_MODEL_CACHE", "KRONA_VERSION"}


def _render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the Kustomize overlays"
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    objects = _render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Deployment", "krona-gateway"), ("Service", "krona-gateway"), ("Ingress", "krona-gateway"),
        ("PodDisruptionBudget", "krona-gateway"), ("HorizontalPodAutoscaler", "krona-gateway"),
        ("Deployment", "krona-worker-train"), ("Deployment", "krona-worker-infer"), ("Job", "krona-migrate"),
        ("ConfigMap", "krona-config"), ("Secret", "krona-secrets"), ("ScaledObject", "krona-worker-train"),
        ("ScaledObject", "krona-worker-infer"), ("NetworkPolicy", "datastores-from-krona-only"),
        ("Deployment", "krona-webhooks"),
    ]:  # fmt: skip
        assert expected in kinds, expected
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            # KEDA's CRDs are not in kubernetes-validate's bundled schemas (it only ships the core API);
            # their fields are checked by test_keda_scales_each_queue below instead.
            continue
        kubernetes_validate.validate(obj, "1.37", strict=True)


def test_keda_scales_each_queue():
    objects = _render("gpu")
    scaled = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ScaledObject"}
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    for name, queue in (("krona-worker-train", "train"), ("krona-worker-infer", "infer")):
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue
    assert scaled["krona-worker-train"]["spec"]["minReplicaCount"] == 0  # training scales to zero


def _workers(objects):
    return [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("krona-worker")]


def test_gpu_and_cpu_overlays():
    for worker in _workers(_render("gpu")):
        pod = worker["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "--concurrency" in pod["containers"][0]["command"] and "1" in pod["containers"][0]["command"]
        # Longer than a checkpoint interval of training, so a stopped trainer loses at most one interval.
        assert pod["terminationGracePeriodSeconds"] >= 300
    cpu = _render("cpu")
    for worker in _workers(cpu):
        assert "nvidia.com/gpu" not in worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    config = next(o for o in cpu if o["kind"] == "ConfigMap")
    assert config["data"]["KRONA_WORKER_DEVICE"] == "cpu"


def test_network_policy_lets_only_krona_reach_the_datastores():
    policy = next(o for o in _render("cpu") if o["metadata"]["name"] == "datastores-from-krona-only")
    assert policy["metadata"]["namespace"] == "krona-data"
    sources = policy["spec"]["ingress"][0]["from"][0]
    components = sources["podSelector"]["matchExpressions"][0]["values"]
    assert set(components) == {"gateway", "worker", "migrate"}


def test_compose_file_validates_and_wires_the_stack():
    check = Path(sys.executable).parent / "check-jsonschema"
    result = subprocess.run(
        [str(check), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {
        "postgres",
        "redis",
        "minio",
        "minio-init",
        "migrate",
        "gateway",
        "worker-train",
        "worker-infer",
        "worker-cpu",
        "worker-webhooks",
    } <= set(services)
    assert "healthcheck" in services["postgres"] and "postgres-data" in compose["volumes"]
    for name in ("gateway", "worker-train", "worker-infer"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["gateway"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    for name in ("worker-train", "worker-infer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
        assert any(v.startswith("hf-cache:") for v in services[name]["volumes"])
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    # Webhook deliveries have their own worker (a thread pool on the slim image), never a GPU worker's queue.
    hooks = services["worker-webhooks"]
    assert hooks["image"].startswith("krona-gateway") and "webhooks" in hooks["command"]
    assert "deploy" not in hooks
    for name in ("worker-train", "worker-infer", "worker-cpu"):
        assert "webhooks" not in services[name]["command"][services[name]["command"].index("-Q") + 1]


def test_dockerfiles_pass_hadolint_and_run_as_non_root():
    hadolint = Path(sys.executable).parent / "hadolint"
    files = sorted((ROOT / "deploy/docker").glob("*.Dockerfile"))
    assert len(files) == 2
    result = subprocess.run([str(hadolint), *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    for path in files:
        text = path.read_text()
        base = re.search(r"^FROM (\S+)", text, re.M).group(1)
        assert ":" in base and not base.endswith(":latest"), base
        assert re.search(r"^USER 10001$", text, re.M)
        assert "HEALTHCHECK" in text


def _variables(text: str) -> set[str]:
    return set(re.findall(r"\b(KRONA_[A-Z0-9_]+)\b", text))


def test_deploy_files_set_exactly_settings_the_code_reads():
    fields = {f"KRONA_{name.upper()}" for name in Settings.model_fields}
    rendered = "\n".join(yaml.safe_dump(o) for overlay in OVERLAYS for o in _render(overlay))
    sources = {
        "docker-compose.yml": (ROOT / "docker-compose.yml").read_text(),
        ".env.example": (ROOT / ".env.example").read_text(),
        "kubernetes": rendered,
        "Dockerfiles": "\n".join(p.read_text() for p in (ROOT / "deploy/docker").glob("*.Dockerfile")),
    }
    for name, text in sources.items():
        unknown = _variables(text) - fields - OTHER_VARIABLES
        assert not unknown, f"{name} sets variables no code reads: {sorted(unknown)}"
    # What production must set is set in the Kubernetes config and secret.
    required = {"KRONA_DATABASE_URL", "KRONA_BROKER_URL", "KRONA_S3_ENDPOINT", "KRONA_S3_ACCESS_KEY",
                "KRONA_S3_SECRET_KEY", "KRONA_BASE_MODEL", "KRONA_ENV"}  # fmt: skip
    assert required <= _variables(sources["kubernetes"])


def _pinned(image: str) -> dict[str, str]:
    """Package name -> the line of deploy/docker/requirements-<image>.txt that pins it."""
    lines = (ROOT / f"deploy/docker/requirements-{image}.txt").read_text().splitlines()
    return {re.split(r"[\[=]", line)[0].lower(): line for line in lines if line and not line.startswith("#")}


def test_docker_requirements_are_generated_from_the_extras():
    """The committed files are what deploy/docker/requirements.py writes from pyproject.toml (`make requirements`)."""
    script = ROOT / "deploy/docker/requirements.py"
    result = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    gateway, worker = _pinned("gateway"), _pinned("worker")
    assert all(re.fullmatch(r"[\w.-]+(\[[\w,]+\])?==\S+", line) for line in [*gateway.values(), *worker.values()])
    # The gateway image (which also runs the webhook worker) pulls no torch; the worker image's torch is a
    # CUDA build its Dockerfile installs from PyTorch's index, before these pins.
    assert not {"torch", "diffusers", "transformers", "accelerate"} & set(gateway)
    assert {"fastapi", "uvicorn", "python-multipart", "celery", "boto3"} <= set(gateway)
    assert {"diffusers", "transformers", "accelerate", "celery", "boto3"} <= set(worker) and "torch" not in worker
    assert "fastapi" not in worker
    for image in ("gateway", "worker"):
        dockerfile = (ROOT / f"deploy/docker/{image}.Dockerfile").read_text()
        assert f"COPY deploy/docker/requirements-{image}.txt /tmp/requirements.txt" in dockerfile
        assert "pip install -r /tmp/requirements.txt" in dockerfile
