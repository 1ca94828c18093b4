"""Deployment files, validated statically (there is no Docker engine or cluster here), and the autoscaler's
queries run on a migrated PostgreSQL database."""

import ipaddress
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from helpers.deploy import (
    K8S,
    KUBERNETES_VERSIONS,
    OVERLAYS,
    ROOT,
    SECRET_FILES,
    copy_with_secrets,
    find,
    kustomize,
    pod_templates,
)

from shared.settings import PLACEHOLDER_SECRET, Settings

# Read by code outside Settings: the tiny-model cache (shared/models/tiny.py); the image tag (compose only).
OTHER_VARIABLES = {"KRONA_MODEL_CACHE", "KRONA_VERSION"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tree, _ = copy_with_secrets(tmp_path_factory.mktemp("deploy"))
    return {overlay: kustomize(tree / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_against_the_kubernetes_schemas(rendered, overlay):
    import kubernetes_validate

    objects = rendered[overlay]
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [
        ("Namespace", "krona"), ("Deployment", "krona-gateway"), ("Service", "krona-gateway"),
        ("Ingress", "krona-gateway"), ("PodDisruptionBudget", "krona-gateway"),
        ("HorizontalPodAutoscaler", "krona-gateway"), ("Deployment", "krona-worker-train"),
        ("Deployment", "krona-worker-infer"), ("ConfigMap", "krona-config"), ("Deployment", "krona-keda-role"),
        ("Secret", "krona-keda"), ("TriggerAuthentication", "krona-postgres"),
        ("ScaledObject", "krona-worker-train"), ("ScaledObject", "krona-worker-infer"),
        ("NetworkPolicy", "krona-ingress"), ("NetworkPolicy", "krona-gateway-ingress"),
        ("NetworkPolicy", "krona-worker-metrics"), ("NetworkPolicy", "krona-egress"), ("Deployment", "krona-webhooks"),
    ]:  # fmt: skip
        assert expected in kinds, expected
    assert any(kind == "Secret" and name.startswith("krona-secrets-") for kind, name in kinds)  # hashed name
    assert any(kind == "ConfigMap" and name.startswith("krona-keda-role-") for kind, name in kinds)  # hashed name
    # No Job: a Job's pod template cannot change, so a re-apply after an upgrade or a rotation would fail.
    assert not any(kind in ("Job", "CronJob") for kind, _ in kinds)
    for obj in objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            # KEDA's CRDs are not in kubernetes-validate's bundled schemas (it only ships the core API): they are
            # validated against KEDA's fields in tests/test_deploy_keda.py.
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_rendering_stops_without_the_secret_files(tmp_path):
    """No placeholder is ever applied: without the operator's secrets.env, kustomize refuses to render."""
    shutil.copytree(K8S, tmp_path / "k8s", ignore=shutil.ignore_patterns(*SECRET_FILES))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k8s/overlays/gpu")], capture_output=True, text=True)
    assert out.returncode != 0 and "secrets.env" in out.stderr
    ignored = subprocess.run(
        ["git", "check-ignore", *(f"deploy/k8s/base/{name}" for name in SECRET_FILES), ".env"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert ignored.stdout.split() == [*(f"deploy/k8s/base/{name}" for name in SECRET_FILES), ".env"]


def test_no_secret_value_is_a_placeholder(tmp_path):
    tree, values = copy_with_secrets(tmp_path)
    for overlay in OVERLAYS:
        objects = kustomize(tree / "overlays" / overlay)
        secret_objects = [o for o in objects if o["kind"] == "Secret"]
        assert {o["metadata"]["name"].rsplit("-", 1)[0] for o in secret_objects} == {"krona-secrets", "krona"}
        import base64

        for obj in secret_objects:
            for key, encoded in obj["data"].items():
                value = base64.b64decode(encoded).decode()
                assert value == values[key]  # only what the operator's files say
                assert PLACEHOLDER_SECRET not in value and value.strip()
    # No committed manifest carries a secret value: Secrets come only from the generator.
    for path in K8S.rglob("*.yaml"):
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert not any(d.get("kind") == "Secret" for d in documents), path
        assert PLACEHOLDER_SECRET not in path.read_text(), path
    # A secrets.env copied from the example and left unedited is refused by the settings (the pods crash-loop
    # with the reason) rather than run with a placeholder.
    example = dict(
        line.split("=", 1)
        for line in (K8S / "base/secrets.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    config = yaml.safe_load((K8S / "base/config.yaml").read_text())["data"]
    fields = {k.removeprefix("KRONA_").lower(): v for k, v in {**config, **example}.items()}
    with pytest.raises(ValueError, match="placeholder"):
        Settings(**fields)


def _scale_targets(objects) -> set[str]:
    targets = {o["spec"]["scaleTargetRef"]["name"] for o in objects if o["kind"] == "ScaledObject"}
    targets |= {o["spec"]["scaleTargetRef"]["name"] for o in objects if o["kind"] == "HorizontalPodAutoscaler"}
    return targets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaled_deployments_set_no_replicas(rendered, overlay):
    objects = rendered[overlay]
    targets = _scale_targets(objects)
    assert {"krona-gateway", "krona-worker-train", "krona-worker-infer"} <= targets
    for deployment in find(objects, "Deployment"):
        if deployment["metadata"]["name"] in targets:
            assert "replicas" not in deployment["spec"], deployment["metadata"]["name"]


def test_keda_scales_each_queue_on_the_database_truth(rendered, postgres_url):
    """Queued plus running jobs per queue, read from PostgreSQL (a Redis list loses a message once a worker takes
    it, so a running training would count zero); each query runs here with the expected counts, by index.
    (tests/test_deploy_keda.py runs them as KEDA's least-privileged role.)"""
    from sqlalchemy import text

    from shared.db import Adapter, Evaluation, Generation, Training, make_engine, make_session_factory
    from shared.tenants import create_tenant

    objects = rendered["gpu"]
    scaled = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ScaledObject"}
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    auth = find(objects, "TriggerAuthentication", "krona-postgres")
    (ref,) = auth["spec"]["secretTargetRef"]
    keda_secret = find(objects, "Secret", ref["name"])
    assert ref["parameter"] == "connection" and ref["key"] in keda_secret["data"]
    queries = {}
    for name, table in (("krona-worker-train", "trainings"), ("krona-worker-infer", "generations")):
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "postgresql" and trigger["authenticationRef"]["name"] == "krona-postgres"
        assert float(trigger["metadata"]["targetQueryValue"]) >= 1
        queries[table] = trigger["metadata"]["query"]
        assert table in queries[table]
        # One source: the file that krona-keda-role runs as KEDA's role.
        query_file = K8S / "base/keda" / ("train.sql" if table == "trainings" else "infer.sql")
        assert queries[table] == query_file.read_text()
    assert scaled["krona-worker-train"]["spec"]["minReplicaCount"] == 0  # training scales to zero
    assert scaled["krona-worker-infer"]["spec"]["minReplicaCount"] >= 1

    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    with sessions() as session:
        tenant, _ = create_tenant(session, f"keda-{uuid.uuid4().hex[:6]}")
        session.flush()
        counts = {table: session.execute(text(query)).scalar() for table, query in queries.items()}
        statuses = ["queued", "queued", "running", "succeeded", "failed", "canceled"]
        for status in statuses:
            session.add(Training(tenant_id=tenant.id, base_model="tiny-sd", instance_prompt="x", status=status))
        for status in [*statuses, "running"]:
            session.add(Generation(tenant_id=tenant.id, prompt="x", width=64, height=64, seed=0, status=status))
        # Adapter evaluations run on the train queue too.
        adapter = Adapter(tenant_id=tenant.id, base_model="tiny-sd", num_parameters=1, size_bytes=1,
                          sha256="0" * 64, storage_key="k")  # fmt: skip
        session.add(adapter)
        session.flush()
        for status in ["queued", "running", "succeeded", "failed", "canceled"]:
            session.add(Evaluation(tenant_id=tenant.id, adapter_id=adapter.id, base_model="tiny-sd", status=status))
        session.flush()
        after = {table: session.execute(text(query)).scalar() for table, query in queries.items()}
        # Queued and running only (a running training keeps its worker, however long it runs).
        assert after["trainings"] - counts["trainings"] == 3 + 2
        assert after["generations"] - counts["generations"] == 4
        # Indexes answer each query (seq scans off here: the test tables are too small to need one).
        session.execute(text("SET LOCAL enable_seqscan = off"))
        indexes = {"trainings": ["ix_trainings_status", "ix_evaluations_status"],
                   "generations": ["ix_generations_status"]}  # fmt: skip
        for table, query in queries.items():
            plan = "\n".join(row[0] for row in session.execute(text(f"EXPLAIN {query}")))
            assert "Seq Scan" not in plan, plan
            for index in indexes[table]:
                assert re.search(rf"Index (Only )?Scan (using|on) {index}", plan), plan
        session.rollback()
    engine.dispose()


# The Pod Security Standards' "restricted" level (kubernetes.io/docs/concepts/security/pod-security-standards).
_RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}  # fmt: skip


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_meets_the_restricted_pod_security_level(rendered, overlay):
    objects = rendered[overlay]
    namespace = find(objects, "Namespace", "krona")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = list(pod_templates(objects))
    assert len(pods) == 5  # gateway (with its migrate init container), train, infer, webhooks, keda-role
    for name, pod in pods:
        pod_context = pod.get("securityContext", {})
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= _RESTRICTED_VOLUMES, (name, volume)
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            context = container.get("securityContext", {})
            merged = {**pod_context, **context}
            assert merged.get("runAsNonRoot") is True, name
            assert merged.get("runAsUser", 1) != 0, name
            assert merged.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), name
            assert context.get("allowPrivilegeEscalation") is False, name
            assert not context.get("privileged"), name
            assert context.get("capabilities", {}).get("drop") == ["ALL"], name
            assert set(context.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}, name
            assert all("hostPort" not in port for port in container.get("ports", [])), name
            # Not required by the level, but every Krona container runs with a read-only root filesystem.
            assert context.get("readOnlyRootFilesystem") is True, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_block_instance_metadata_and_name_only_created_namespaces(rendered, overlay):
    objects = rendered[overlay]
    created = {o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"}
    for obj in objects:
        if obj["kind"] not in ("Namespace",) and "namespace" in obj["metadata"]:
            assert obj["metadata"]["namespace"] in created, (obj["kind"], obj["metadata"]["name"])
    egress = find(objects, "NetworkPolicy", "krona-egress")["spec"]
    assert egress["podSelector"] == {} and egress["policyTypes"] == ["Egress"]
    metadata_ips = [ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")]
    for rule in egress["egress"]:
        assert rule.get("to"), "a rule without `to` allows every destination"
        for peer in rule["to"]:
            if "ipBlock" not in peer:
                assert "namespaceSelector" in peer  # pods of named namespaces only
                continue
            block = peer["ipBlock"]
            cidr = ipaddress.ip_network(block["cidr"])
            excepted = [ipaddress.ip_network(e) for e in block.get("except", [])]
            for ip in metadata_ips:
                if ip.version == cidr.version and ip in cidr:
                    assert any(ip in e for e in excepted), (block, ip)


def test_the_datastores_policy_comes_with_its_namespace():
    objects = kustomize(K8S / "datastores")
    assert {(o["kind"], o["metadata"]["name"]) for o in objects} == {
        ("Namespace", "krona-data"),
        ("NetworkPolicy", "datastores-from-krona-only"),
    }
    policy = find(objects, "NetworkPolicy", "datastores-from-krona-only")
    assert policy["metadata"]["namespace"] == "krona-data"
    sources = policy["spec"]["ingress"][0]["from"][0]
    components = sources["podSelector"]["matchExpressions"][0]["values"]
    assert set(components) == {"gateway", "worker"}  # the migrate init container runs in the gateway's pod
    # Who may reach which port is checked connection by connection in tests/test_deploy_network.py.


def test_ingress_has_tls_and_a_class_and_routes_neither_metrics_nor_probes(rendered):
    ingress = find(rendered["gpu"], "Ingress", "krona-gateway")["spec"]
    assert ingress["ingressClassName"]
    hosts = {rule["host"] for rule in ingress["rules"]}
    assert hosts <= {host for tls in ingress["tls"] for host in tls["hosts"]} and all(
        t["secretName"] for t in ingress["tls"]
    )
    paths = [(p["path"], p["pathType"]) for rule in ingress["rules"] for p in rule["http"]["paths"]]
    assert ("/v1", "Prefix") in paths
    for internal in ("/metrics", "/healthz", "/readyz"):
        for path, kind in paths:
            routed = (
                internal == path if kind == "Exact" else internal.startswith(path.rstrip("/") + "/") or internal == path
            )
            assert not routed, (internal, path, kind)


def test_migrations_run_before_the_gateway_on_its_image_and_survive_any_image_or_secret_change(rendered, tmp_path):
    """`krona migrate` is the gateway pod's init container (no Job: a Job's pod template cannot change). Whatever
    an operator changes, a registry with a port, an outer overlay's `images:`, a rotated secret, the result is a
    Deployment that `kubectl apply` can update, with the migration on the new image."""
    for overlay in OVERLAYS:
        gateway = find(rendered[overlay], "Deployment", "krona-gateway")["spec"]["template"]["spec"]
        (init,) = gateway["initContainers"]
        (container,) = gateway["containers"]
        assert init["name"] == "migrate" and init["command"] == ["python", "-m", "services.cli.main", "migrate"]
        assert init["image"] == container["image"] == "krona-gateway:1.0.0"  # not the CUDA worker image
        assert init["envFrom"] == container["envFrom"]

    def render(tree):
        objects = kustomize(tree / "outer")
        assert not any(o["kind"] in ("Job", "CronJob") for o in objects)
        return {(o["kind"], o["metadata"]["name"]): o for o in objects}

    # An outer overlay (the operator's) on top of ours, with a registry that has a port and a tag with '-'.
    tree, _ = copy_with_secrets(tmp_path)
    (tree / "outer").mkdir()
    (tree / "outer/kustomization.yaml").write_text(
        "resources: [../overlays/gpu]\nimages:\n"
        "  - {name: krona-gateway, newName: registry.example.com:5000/krona/krona-gateway, newTag: 1.1.0-rc.2}\n"
        "  - {name: krona-worker, newName: registry.example.com:5000/krona/krona-worker, newTag: 1.1.0-rc.2}\n"
    )
    before = render(tree)
    pod = before[("Deployment", "krona-gateway")]["spec"]["template"]["spec"]
    image = "registry.example.com:5000/krona/krona-gateway:1.1.0-rc.2"
    assert pod["initContainers"][0]["image"] == pod["containers"][0]["image"] == image
    assert before[("Deployment", "krona-keda-role")]["spec"]["template"]["spec"]["containers"][0]["image"] == image
    # A rotated secret: the same objects (no new names but the hashed Secret's), the pods roll.
    secrets_env = tree / "base/secrets.env"
    secrets_env.write_text(secrets_env.read_text().replace("KRONA_S3_SECRET_KEY=", "KRONA_S3_SECRET_KEY=rotated-"))
    after = render(tree)
    changed = {key for key in before.keys() & after.keys() if before[key] != after[key]}
    assert {k for k in before if k[0] != "Secret"} == {k for k in after if k[0] != "Secret"}
    assert ("Deployment", "krona-gateway") in changed and all(kind == "Deployment" for kind, _ in changed)


def test_the_migrate_command_is_idempotent_on_a_migrated_database(postgres_url, tmp_path):
    """What the init container runs, run twice on an already migrated database: nothing to do, status 0. (No S3 is
    configured here, so the bucket step is the local-storage no-op; tests/test_migrate_bucket.py covers S3.)"""
    import os

    env = {**os.environ, "KRONA_DATABASE_URL": postgres_url, "KRONA_DATA_DIR": str(tmp_path), "HOME": str(tmp_path)}
    for _ in range(2):
        result = subprocess.run([sys.executable, "-m", "services.cli.main", "migrate"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "database at migration head" in result.stdout


def _workers(objects):
    return [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].startswith("krona-worker")]


def test_gpu_and_cpu_overlays(rendered):
    for worker in _workers(rendered["gpu"]):
        pod = worker["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "--concurrency" in pod["containers"][0]["command"] and "1" in pod["containers"][0]["command"]
        # Room for a training step and its checkpoint (the drain), or a whole generation batch.
        assert pod["terminationGracePeriodSeconds"] >= 300
    cpu = rendered["cpu"]
    for worker in _workers(cpu):
        assert "nvidia.com/gpu" not in worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    config = find(cpu, "ConfigMap", "krona-config")
    assert config["data"]["KRONA_WORKER_DEVICE"] == "cpu"


def _alive_check() -> str:
    """The probe command's script: the age of the file workers/tasks.py touches."""
    from workers.tasks import ALIVE_FILE, ALIVE_INTERVAL_SECONDS

    assert ALIVE_INTERVAL_SECONDS * 3 <= 60
    return f"import os, sys, time; sys.exit(time.time() - os.path.getmtime('/tmp/{ALIVE_FILE.name}') > 60)"


def test_worker_probes_read_the_liveness_file_a_busy_worker_keeps_fresh(rendered):
    check = ["python", "-c", _alive_check()]
    objects = rendered["gpu"]
    workers = [o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] in
               ("krona-worker-train", "krona-worker-infer", "krona-webhooks")]  # fmt: skip
    assert len(workers) == 3
    for worker in workers:
        pod = worker["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["startupProbe"]["exec"]["command"] == check
        assert container["livenessProbe"]["exec"]["command"] == check
        assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}  # where the file is written
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in ("worker-train", "worker-infer", "worker-cpu", "worker-webhooks"):
        assert compose[name]["healthcheck"]["test"] == ["CMD", *check], name
    dockerfile = (ROOT / "deploy/docker/worker.Dockerfile").read_text()
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :]
    assert "inspect" not in healthcheck.split("\nCMD")[0] and _alive_check() in healthcheck


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_scratch_volume_has_a_size_limit(rendered, overlay):
    for name, pod in pod_templates(rendered[overlay]):
        for volume in pod.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), (name, volume["name"])
    for worker in _workers(rendered[overlay]):
        mounts = {m["mountPath"] for m in worker["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/cache" in mounts


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
    # The migration runs on the slim image: no CUDA image is pulled to migrate.
    assert services["migrate"]["image"].startswith("krona-gateway") and services["migrate"]["command"][-1] == "migrate"
    # Each GPU worker reserves a GPU of its own by index (`count: 1` would give both GPU 0).
    gpus = []
    for name in ("worker-train", "worker-infer"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and "count" not in device
        (gpu,) = device["device_ids"]
        gpus.append(re.fullmatch(r"\$\{(\w+):-(\d+)\}", gpu).groups())
        assert any(v.startswith("hf-cache:/cache/huggingface") for v in services[name]["volumes"])
    assert gpus == [("TRAIN_GPU", "0"), ("INFER_GPU", "1")]
    env_example = (ROOT / ".env.example").read_text()
    assert "TRAIN_GPU=0" in env_example and "INFER_GPU=1" in env_example
    # The gateway needs no model cache (it never downloads or builds a model).
    assert "volumes" not in services["gateway"]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    # Webhook deliveries have their own worker (a thread pool on the slim image), never a GPU worker's queue.
    hooks = services["worker-webhooks"]
    assert hooks["image"].startswith("krona-gateway") and "webhooks" in hooks["command"]
    assert "deploy" not in hooks
    for name in ("worker-train", "worker-infer", "worker-cpu"):
        assert "webhooks" not in services[name]["command"][services[name]["command"].index("-Q") + 1]
        assert services[name]["command"][0] == "python"


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
        # The caches exist in the image, owned by the user, so the volumes mounted there are writable.
        assert "mkdir -p /cache/huggingface /cache/krona && chown -R krona:krona /cache" in text
        assert "HF_HOME=/cache/huggingface" in text and "--home-dir /home/krona --create-home" in text


def test_the_images_ship_the_python_and_torch_the_tests_ran():
    import torch

    minor = f"{sys.version_info.major}.{sys.version_info.minor}"
    for image in ("gateway", "worker"):
        text = (ROOT / f"deploy/docker/{image}.Dockerfile").read_text()
        base = re.search(r"^FROM python:(\d+)\.(\d+)\.\d+-slim-\w+$", text, re.M)
        assert base and f"{base.group(1)}.{base.group(2)}" == minor, (image, base)
    worker = (ROOT / "deploy/docker/worker.Dockerfile").read_text()
    tested = torch.__version__.split("+")[0]
    makefile = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert re.search(rf"^ARG TORCH_VERSION={re.escape(tested)}$", worker, re.M) and makefile == tested
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+$", worker, re.M)
    assert 'pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in worker
    assert "python3.11=" not in worker and "apt-get" not in worker  # no distribution Python to pin


def _variables(text: str) -> set[str]:
    return set(re.findall(r"\b(KRONA_[A-Z0-9_]+)\b", text))


def test_deploy_files_set_exactly_settings_the_code_reads(rendered):
    fields = {f"KRONA_{name.upper()}" for name in Settings.model_fields}
    text = "\n".join(yaml.safe_dump(o) for overlay in OVERLAYS for o in rendered[overlay])
    sources = {
        "docker-compose.yml": (ROOT / "docker-compose.yml").read_text(),
        ".env.example": (ROOT / ".env.example").read_text(),
        "kubernetes": text,
        "secrets.env.example": (K8S / "base/secrets.env.example").read_text(),
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
    # The gateway image (which also runs the webhook worker and the migration) pulls no torch; the worker image's
    # torch is a CUDA build its Dockerfile installs from PyTorch's index, before these pins.
    assert not {"torch", "diffusers", "transformers", "accelerate"} & set(gateway)
    assert {"fastapi", "uvicorn", "python-multipart", "celery", "boto3", "alembic", "psycopg"} <= set(gateway)
    assert {"diffusers", "transformers", "accelerate", "celery", "boto3"} <= set(worker) and "torch" not in worker
    assert "fastapi" not in worker
    for image in ("gateway", "worker"):
        dockerfile = (ROOT / f"deploy/docker/{image}.Dockerfile").read_text()
        assert f"COPY deploy/docker/requirements-{image}.txt /tmp/requirements.txt" in dockerfile
        assert "pip install -r /tmp/requirements.txt" in dockerfile
