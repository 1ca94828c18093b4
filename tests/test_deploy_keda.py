"""KEDA: the rendered ScaledObjects and TriggerAuthentication against KEDA's fields, and the least-privileged role
KEDA logs in as, made by deploy/k8s/base/keda/keda_role.py exactly as the krona-keda-role pod runs it, on a
migrated PostgreSQL database: the scaler queries answer as that role, and nothing else is readable."""

import importlib.util
import os
import subprocess
import sys
import uuid
from pathlib import Path

import jsonschema
import pytest
from helpers.deploy import K8S, KUBERNETES_VERSIONS, copy_with_secrets, find, kustomize

KEDA_DIR = K8S / "base/keda"

# KEDA's custom resources, as a JSON schema of the fields KEDA 2.x defines (written from KEDA's CRDs
# keda.sh_scaledobjects.yaml and keda.sh_triggerauthentications.yaml, keda.sh/v1alpha1, KEDA 2.12-2.17, and the
# PostgreSQL scaler's documented parameters), strict as `kubectl apply --validate=strict` is on a CRD: an
# unknown field (a typo) is an error. Objects of Kubernetes' own types inside them (the HPA behaviour) are
# checked by kubernetes-validate below. Fields Krona does not use are allowed by name only.
_ANY = {}
_INT32 = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "pollingInterval": _INT32,
                "cooldownPeriod": _INT32,
                "initialCooldownPeriod": _INT32,
                "idleReplicaCount": _INT32,
                "minReplicaCount": _INT32,
                "maxReplicaCount": _INT32,
                "fallback": _ANY,
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": {"type": "string"}, "behavior": {"type": "object"}},
                        },
                        "scalingModifiers": _ANY,
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "useCachedMetrics": {"type": "boolean"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            # KEDA's trigger metadata is a map of strings: a number here is rejected by the API.
                            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                            "authenticationRef": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string"},
                                    "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
_TRIGGER_AUTHENTICATION = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "secretTargetRef": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["parameter", "name", "key"],
                        "additionalProperties": False,
                        "properties": {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                    },
                },
                **{
                    name: _ANY
                    for name in (
                        "env",
                        "configMapTargetRef",
                        "podIdentity",
                        "hashiCorpVault",
                        "azureKeyVault",
                        "awsSecretManager",
                        "gcpSecretManager",
                        "boundServiceAccountToken",
                    )
                },
            },
        },
    },
}
# KEDA's PostgreSQL scaler: its trigger metadata and its authentication parameters.
POSTGRES_METADATA = {"query", "targetQueryValue", "activationTargetQueryValue", "connectionFromEnv", "host", "port",
                     "userName", "dbName", "sslmode", "passwordFromEnv"}  # fmt: skip
POSTGRES_AUTH_PARAMETERS = {"connection", "password", "host", "port", "userName", "dbName", "sslmode"}


def _keda_role_module():
    spec = importlib.util.spec_from_file_location("keda_role", KEDA_DIR / "keda_role.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    tree, _ = copy_with_secrets(tmp_path_factory.mktemp("deploy"))
    return {overlay: kustomize(tree / "overlays" / overlay) for overlay in ("cpu", "gpu")}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_keda_objects_validate_against_keda_fields(rendered, overlay):
    import kubernetes_validate

    objects = rendered[overlay]
    keda = [o for o in objects if o["apiVersion"].startswith("keda.sh/")]
    assert sorted(o["kind"] for o in keda) == ["ScaledObject", "ScaledObject", "TriggerAuthentication"]
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    for obj in keda:
        schema = _SCALED_OBJECT if obj["kind"] == "ScaledObject" else _TRIGGER_AUTHENTICATION
        jsonschema.Draft202012Validator(schema).validate(obj)
        assert obj["metadata"]["namespace"] == "krona"
    auth = find(objects, "TriggerAuthentication", "krona-postgres")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] in POSTGRES_AUTH_PARAMETERS
        assert ref["key"] in secrets[ref["name"]]["data"]  # the Secret exists under that name (no hash suffix)
    for scaled in (o for o in keda if o["kind"] == "ScaledObject"):
        spec = scaled["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments
        assert spec["minReplicaCount"] <= spec["maxReplicaCount"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "postgresql" and set(trigger["metadata"]) <= POSTGRES_METADATA
            assert trigger["authenticationRef"]["name"] == "krona-postgres"
            assert float(trigger["metadata"]["targetQueryValue"]) > 0
        # The HPA behaviour KEDA hands to the HPA it makes: Kubernetes' own type, validated by Kubernetes' schema.
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "keda-hpa"},
               "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
                        "minReplicas": 1, "maxReplicas": spec["maxReplicaCount"], "behavior": behavior}}  # fmt: skip
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(hpa, version, strict=True)


def test_the_schema_rejects_what_the_api_server_would():
    """The schema above is not vacuous: a typo, a number as metadata, a missing target are refused."""
    trigger = {"type": "postgresql", "metadata": {"query": "q"}}
    good = {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"},
            "spec": {"scaleTargetRef": {"name": "d"}, "triggers": [trigger]}}  # fmt: skip
    jsonschema.validate(good, _SCALED_OBJECT)
    bad = [
        {**good, "spec": {**good["spec"], "minReplicas": 0}},
        {**good, "spec": {**good["spec"], "triggers": [{"type": "postgresql", "metadata": {"targetQueryValue": 1}}]}},
        {**good, "spec": {"triggers": good["spec"]["triggers"]}},
    ]
    for obj in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(obj, _SCALED_OBJECT)


def test_the_queries_krona_keda_role_checks_are_the_ones_keda_runs(rendered):
    objects = rendered["gpu"]
    (config,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("krona-keda-role")]
    for name, query_file in (("krona-worker-train", "train.sql"), ("krona-worker-infer", "infer.sql")):
        (trigger,) = find(objects, "ScaledObject", name)["spec"]["triggers"]
        assert trigger["metadata"]["query"] == config["data"][query_file] == (KEDA_DIR / query_file).read_text()
    assert config["data"]["keda_role.py"] == (KEDA_DIR / "keda_role.py").read_text()
    # The pod runs the script and both queries from the ConfigMap, with KEDA's URL from the mounted Secret.
    pod = find(objects, "Deployment", "krona-keda-role")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    script_volume = next(n for n, v in volumes.items() if "configMap" in v)
    script_dir = mounts[script_volume]
    assert volumes[script_volume]["configMap"]["name"] == config["metadata"]["name"]
    secret_volume = next(n for n, v in volumes.items() if "secret" in v)
    assert volumes[secret_volume]["secret"]["secretName"] == "krona-keda"
    command = container["command"]
    assert command[:2] == ["python", f"{script_dir}/keda_role.py"]
    assert command[command.index("--connection-file") + 1] == f"{mounts[secret_volume]}/POSTGRES_CONNECTION"
    queries = command[command.index("--queries") + 1 :]
    assert queries == [f"{script_dir}/train.sql", f"{script_dir}/infer.sql"]
    assert float(command[command.index("--every") + 1]) <= 600
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["KRONA_DATABASE_URL"]["name"].startswith("krona-secrets-")


def _keda_role_command(rendered, connection_file: Path) -> list[str]:
    """The krona-keda-role pod's command, once (no --every), with the ConfigMap's and the Secret's files replaced
    by this checkout's and ``connection_file``."""
    (container,) = find(rendered["gpu"], "Deployment", "krona-keda-role")["spec"]["template"]["spec"]["containers"]
    command = list(container["command"])
    every = command.index("--every")
    del command[every : every + 2]
    command[0] = sys.executable
    command = [str(KEDA_DIR / Path(arg).name) if arg.startswith("/opt/krona-keda/") else arg for arg in command]
    command[command.index("--connection-file") + 1] = str(connection_file)
    return command


def _run(command, admin_url: str, connection: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "POSTGRES_CONNECTION").write_text(connection + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KRONA_", "POSTGRES_"))}
    env["KRONA_DATABASE_URL"] = admin_url
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_keda_role_runs_the_scaler_queries_and_reads_nothing_else(rendered, tmp_path):
    """The role KEDA logs in as, made by krona-keda-role on a migrated database: each query gives the expected
    count as that role (by index), every other column and table is refused, and it cannot write."""
    import psycopg
    from helpers.services import fresh_postgres_database

    from shared.db import Adapter, Evaluation, Generation, Training, make_engine, make_session_factory
    from shared.tenants import create_tenant

    keda_role = _keda_role_module()
    role, app_role = f"keda_{uuid.uuid4().hex[:8]}", f"app_{uuid.uuid4().hex[:8]}"
    command = _keda_role_command(rendered, tmp_path / "POSTGRES_CONNECTION")
    admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True)
    try:
        with fresh_postgres_database("krona_keda") as url:
            database = url.rsplit("/", 1)[1]
            keda_url = f"postgresql://{role}:{{}}@127.0.0.1:5432/{database}?sslmode=disable"
            connection = keda_url.format(f"s%40fe-{uuid.uuid4().hex}")
            # Before any run: the role does not exist, and an application role that may not create roles says what
            # an administrator must run, without creating anything.
            admin.execute(f'CREATE ROLE "{app_role}" LOGIN')
            app_url = f"postgresql+psycopg://{app_role}@127.0.0.1:5432/{database}"
            refused = _run(command, app_url, connection, tmp_path)
            assert refused.returncode == 1 and f"CREATE ROLE {role} LOGIN" in refused.stderr, refused.stderr
            # A keda.env left as the example: refused, with the reason.
            refused = _run(command, url, keda_url.format("change-me"), tmp_path)
            assert refused.returncode == 1 and "keda.env" in refused.stderr and "password" in refused.stderr

            engine = make_engine(url)
            sessions = make_session_factory(engine)
            with sessions() as session:
                tenant, _ = create_tenant(session, "keda")
                session.flush()
                statuses = ["queued", "queued", "running", "succeeded", "failed", "canceled"]
                for status in statuses:
                    session.add(Training(tenant_id=tenant.id, base_model="tiny-sd", instance_prompt="x", status=status))
                    session.add(Generation(tenant_id=tenant.id, prompt="x", width=64, height=64, seed=0, status=status))
                adapter = Adapter(tenant_id=tenant.id, base_model="tiny-sd", num_parameters=1, size_bytes=1,
                                  sha256="0" * 64, storage_key="k")  # fmt: skip
                session.add(adapter)
                session.flush()
                for status in ["queued", "running", "succeeded", "failed"]:
                    session.add(Evaluation(tenant_id=tenant.id, adapter_id=adapter.id, base_model="x", status=status))
                session.commit()
            engine.dispose()
            # What deploy/README.md used to tell operators to grant (whole tables): taken back by the run.
            admin.execute(f'CREATE ROLE "{role}" LOGIN')
            with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as owner:
                owner.execute(f'GRANT SELECT ON trainings, generations, adapters TO "{role}"')

            for _ in range(2):  # idempotent: a second run (as every 5 minutes) changes nothing
                result = _run(command, url, connection, tmp_path)
                assert result.returncode == 0, result.stderr
                assert "train.sql = 5" in result.stdout and "infer.sql = 3" in result.stdout, result.stdout

            with psycopg.connect(connection) as keda:
                assert keda.execute("SELECT current_user").fetchone()[0] == role
                counts = {name: keda.execute((KEDA_DIR / name).read_text()).fetchone()[0]
                          for name in ("train.sql", "infer.sql")}  # fmt: skip
                assert counts == {"train.sql": 3 + 2, "infer.sql": 3}  # queued + running only
                keda.execute("SET enable_seqscan = off")
                for name, indexes in (("train.sql", ["ix_trainings_status", "ix_evaluations_status"]),
                                      ("infer.sql", ["ix_generations_status"])):  # fmt: skip
                    plan = "\n".join(row[0] for row in keda.execute("EXPLAIN " + (KEDA_DIR / name).read_text()))
                    assert "Seq Scan" not in plan and all(index in plan for index in indexes), plan
                keda.rollback()
                tables = [r[0] for r in keda.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")]  # fmt: skip
                assert {"tenants", "api_keys", "adapters", "trainings"} <= set(tables)
                for table in tables:
                    assert not keda.execute("SELECT has_table_privilege(%s, 'SELECT')", [table]).fetchone()[0], table
                    readable = {row[0] for row in keda.execute(
                        "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                        " AND has_column_privilege(table_name, column_name, 'SELECT')", [table])}  # fmt: skip
                    assert readable == set(keda_role.READS.get(table, ())), (table, readable)
                for denied in ("SELECT id FROM trainings", "SELECT count(*) FROM tenants", "SELECT * FROM adapters",
                               "SELECT prompt FROM generations"):  # fmt: skip
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        keda.execute(denied)
                    keda.rollback()
                assert keda.execute("SHOW default_transaction_read_only").fetchone()[0] == "on"
                with pytest.raises((psycopg.errors.ReadOnlySqlTransaction, psycopg.errors.InsufficientPrivilege)):
                    keda.execute("UPDATE trainings SET status = 'queued'")
                keda.rollback()
            attributes = admin.execute(
                "SELECT rolsuper, rolcreaterole, rolcreatedb, rolinherit, rolconnlimit FROM pg_roles"
                " WHERE rolname = %s",
                [role],
            ).fetchone()
            assert attributes == (False, False, False, False, 4)
            # A managed database: the application's role owns the tables but may not create roles, and an
            # administrator made KEDA's role. The pod grants and checks, and leaves the password alone.
            with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as owner:
                for table in ("trainings", "evaluations", "generations", "adapters"):
                    owner.execute(f'ALTER TABLE {table} OWNER TO "{app_role}"')
            result = _run(command, app_url, connection, tmp_path)
            assert result.returncode == 0, result.stderr
            assert "created" not in result.stdout and "train.sql = 5" in result.stdout, result.stdout
            # A role with more power than KEDA needs is refused, not used.
            admin.execute(f'ALTER ROLE "{role}" CREATEROLE')
            refused = _run(command, url, connection, tmp_path)
            assert refused.returncode == 1 and "give it a role of its own" in refused.stderr
    finally:
        for name in (role, app_role):
            admin.execute(f'DROP ROLE IF EXISTS "{name}"')
        admin.close()


def test_an_unedited_keda_env_is_refused_before_anything_is_changed(tmp_path):
    """The placeholder check needs no database: the script stops on it first."""
    keda_role = _keda_role_module()
    example = (K8S / "base/keda.env.example").read_text()
    (line,) = [line for line in example.splitlines() if line.startswith("POSTGRES_CONNECTION=")]
    with pytest.raises(keda_role.SetupError, match="example's password"):
        keda_role.keda_login(line.split("=", 1)[1])
    assert keda_role.keda_login("postgresql://krona_keda:a%40b%3Ac@h:5432/krona") == ("krona_keda", "a@b:c")
    libpq = keda_role.libpq_url("postgresql+psycopg://u:p@h/db?sslmode=require")
    assert libpq == "postgresql://u:p@h/db?sslmode=require"
