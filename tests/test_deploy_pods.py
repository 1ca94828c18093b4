"""The pods' probes, scratch space and disk requests, read from the rendered manifests and compared with what the
code does (the gateway's start, its uploads, its readiness answer), and the Python the project needs."""

import re
import sys
import tomllib
from urllib.parse import parse_qs, urlparse

import pytest
from helpers.deploy import OVERLAYS, ROOT, copy_with_secrets, find, kustomize, pod_templates

MIB = 1024**2
# Measured (issue 22): ~6.5 s of CPU to start one gateway process; 61 s to the first /healthz with two processes
# on a loaded node at a 250m CPU request. Two concurrent uploads of the maximum size spooled 358 MiB to /tmp.
GATEWAY_FIRST_HEALTHZ_SECONDS = 61
TWO_MAXIMUM_UPLOADS_SPOOL_BYTES = 358 * MIB
# The gateway's /tmp is sized for this many concurrent maximum uploads per gateway process.
UPLOADS_PER_PROCESS = 4


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tree, _ = copy_with_secrets(tmp_path_factory.mktemp("deploy"))
    return {overlay: kustomize(tree / "overlays" / overlay) for overlay in OVERLAYS}


def quantity(text: str | int) -> float:
    """A Kubernetes quantity in bytes (or plain units): 2Gi, 2304Mi, 500M, 1.5, 250m."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    number, suffix = float(match.group(1)), match.group(2)
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    decimal = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    return number * (binary[suffix] if suffix in binary else decimal[suffix])


def _gateway(objects) -> dict:
    (container,) = find(objects, "Deployment", "krona-gateway")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_has_time_to_start_and_probes_that_wait_long_enough(rendered, overlay):
    container = _gateway(rendered[overlay])
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 4 * GATEWAY_FIRST_HEALTHZ_SECONDS, budget  # a slower node or a larger image still starts
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[name]
        # The default timeout (1 s) failed the probes of a gateway busy with uploads and image decoding.
        assert probe.get("timeoutSeconds", 1) >= 3, name
        assert probe["httpGet"]["port"] == "http"
    # Liveness may restart a stuck process, not a slow one: a few periods of failures first.
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness.get("failureThreshold", 3) >= 45
    workers = int(find(rendered[overlay], "ConfigMap", "krona-config")["data"]["KRONA_GATEWAY_WORKERS"])
    assert workers >= 2  # what the 61 s were measured with


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_readiness_asks_only_for_what_the_gateway_pod_needs(rendered, overlay):
    """A broker or storage outage must not take every gateway pod out of the Service: reads need the database
    only, and the routes that need the broker or storage answer 503 with the cause themselves."""
    probe = _gateway(rendered[overlay])["readinessProbe"]["httpGet"]
    url = urlparse(probe["path"])
    assert url.path == "/readyz"
    assert parse_qs(url.query) == {"require": ["database"]}


def test_the_readiness_path_stays_ready_during_a_storage_and_broker_outage(rendered, postgres_url, tmp_path):
    from fastapi.testclient import TestClient

    from services.gateway.app import create_app
    from shared.settings import Settings
    from shared.storage import LocalStorage

    class Down:
        def check(self) -> None:
            raise ConnectionError("down")

    class DownStorage(LocalStorage):
        def check(self) -> None:
            raise ConnectionError("down")

    class DownEnqueuer(Down):
        def send(self, task: str, job_id: str) -> None:
            raise ConnectionError("down")

    path = _gateway(rendered["gpu"])["readinessProbe"]["httpGet"]["path"]
    settings = Settings(database_url=postgres_url, data_dir=tmp_path, blob_dir=tmp_path / "blobs", base_model="tiny-sd")
    app = create_app(settings, enqueuer=DownEnqueuer(), storage=DownStorage(tmp_path / "blobs"))
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503  # the full answer still says something is down
        answer = client.get(path)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["storage"].startswith("error") and body["checks"]["broker"].startswith("error")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_gateway_tmp_holds_the_uploads_it_may_receive_at_once(rendered, overlay):
    """Multipart files over 1 MB are spooled to /tmp; an emptyDir over its sizeLimit gets the pod evicted."""
    from shared.settings import Settings

    objects = rendered[overlay]
    pod = find(objects, "Deployment", "krona-gateway")["spec"]["template"]["spec"]
    tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
    assert {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}["/tmp"] == "tmp"
    size = quantity(tmp["emptyDir"]["sizeLimit"])
    workers = int(find(objects, "ConfigMap", "krona-config")["data"]["KRONA_GATEWAY_WORKERS"])
    max_request = Settings.model_fields["max_request_bytes"].default
    assert size >= workers * UPLOADS_PER_PROCESS * max_request
    assert size >= 2 * TWO_MAXIMUM_UPLOADS_SPOOL_BYTES
    # The ingress lets through what the gateway accepts, no more.
    ingress = find(objects, "Ingress", "krona-gateway")
    assert (
        quantity(ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"].upper())
        <= max_request * 1.05
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_requests_the_node_disk_its_scratch_volumes_may_fill(rendered, overlay):
    """The workers' 40 GiB caches were emptyDirs without an ephemeral-storage request: the scheduler could put a
    pod on a node without the room, and the kubelet evicted it once the disk filled."""
    for name, pod in pod_templates(rendered[overlay]):
        scratch = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in pod.get("volumes", []) if "emptyDir" in v)
        requested = sum(
            quantity(c["resources"].get("requests", {}).get("ephemeral-storage", 0)) for c in pod["containers"]
        )
        assert requested >= scratch + 64 * MIB, (name, scratch, requested)  # the volumes and the logs
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            limits = container["resources"].get("limits", {})
            # A container limit below the volumes would evict the pod before a volume is full.
            assert "ephemeral-storage" not in limits or quantity(limits["ephemeral-storage"]) >= scratch, name
    caches = [v for _, pod in pod_templates(rendered[overlay]) for v in pod.get("volumes", []) if v["name"] == "cache"]
    assert caches and all(quantity(v["emptyDir"]["sizeLimit"]) >= 40 * 2**30 for v in caches)


def test_requires_python_admits_only_pythons_the_code_runs_on():
    """Checkpoints are restored with tarfile's extractall(filter=...), which Python 3.11 has from 3.11.4 on."""
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    supported = SpecifierSet(project["requires-python"])
    assert "filter=" in (ROOT / "workers/training/job.py").read_text()
    assert not supported.contains("3.11.3") and supported.contains("3.11.4")
    assert supported.contains(".".join(map(str, sys.version_info[:3])))  # the tests' Python
    for image in ("gateway", "worker"):
        text = (ROOT / f"deploy/docker/{image}.Dockerfile").read_text()
        version = re.search(r"^FROM python:(\d+\.\d+\.\d+)-", text, re.M).group(1)
        assert supported.contains(version), (image, version)
