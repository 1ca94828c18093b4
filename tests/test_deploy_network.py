"""NetworkPolicies, connection by connection: an evaluator of the NetworkPolicy semantics (policies select pods;
a pod selected by a policy of a direction accepts only what some rule of one of them allows; ipBlock, namespace
and pod selectors, ports) asked about each connection Krona, KEDA, Prometheus and DNS make, with the ports taken
from the manifests and the example settings, not repeated here."""

import ipaddress
from urllib.parse import urlparse

import pytest
import yaml
from helpers.deploy import K8S, copy_with_secrets, find, kustomize


def _selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels, matchExpressions) selects ``labels``; {} selects everything."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def _namespace(name: str, **labels) -> dict:
    return {"kubernetes.io/metadata.name": name, **labels}


class Endpoint:
    """One side of a connection: a pod (its namespace's labels, its labels, an IP) or an address outside."""

    def __init__(self, namespace: dict | None = None, pod: dict | None = None, ip: str = "10.9.8.7"):
        self.namespace, self.pod, self.ip = namespace, pod, ipaddress.ip_address(ip)


def _peer_matches(peer: dict, policy_namespace: str, other: Endpoint) -> bool:
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        cidr = ipaddress.ip_network(block["cidr"])
        if other.ip.version != cidr.version or other.ip not in cidr:
            return False
        return not any(other.ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if other.pod is None:  # an address outside the cluster's pods matches only ipBlocks
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], other.namespace):
            return False
    elif other.namespace["kubernetes.io/metadata.name"] != policy_namespace:
        return False
    return _selects(peer.get("podSelector", {}), other.pod)


def _port_matches(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and p.get("port") in (None, port) for p in ports)


def allowed(policies: list[dict], source: Endpoint, destination: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether the policies let ``source`` open ``port`` on ``destination`` (both directions must allow it)."""
    for direction, target, other, key, field in (
        ("Egress", source, destination, "egress", "to"),
        ("Ingress", destination, source, "ingress", "from"),
    ):
        if target.pod is None:
            continue  # outside the cluster: no policy of ours applies there
        namespace = target.namespace["kubernetes.io/metadata.name"]
        selecting = [
            p for p in policies
            if p["metadata"]["namespace"] == namespace and direction in p["spec"]["policyTypes"]
            and _selects(p["spec"]["podSelector"], target.pod)
        ]  # fmt: skip
        if not selecting:
            continue
        if not any(
            _port_matches(rule, port, protocol)
            and (field not in rule or any(_peer_matches(peer, namespace, other) for peer in rule[field]))
            for policy in selecting
            for rule in policy["spec"].get(key, [])
        ):
            return False
    return True


KRONA = _namespace("krona", **{"pod-security.kubernetes.io/enforce": "restricted"})
DATA = _namespace("krona-data")
INGRESS_NGINX = Endpoint(_namespace("ingress-nginx"), {"app.kubernetes.io/name": "ingress-nginx"})
PROMETHEUS = Endpoint(_namespace("monitoring"), {"app.kubernetes.io/name": "prometheus"})
GRAFANA = Endpoint(_namespace("monitoring"), {"app.kubernetes.io/name": "grafana"})
KEDA_OPERATOR = Endpoint(_namespace("keda"), {"app": "keda-operator", "app.kubernetes.io/name": "keda-operator"})
STRANGER = Endpoint(_namespace("default"), {"app": "whatever"})
KUBE_DNS = Endpoint(_namespace("kube-system"), {"k8s-app": "kube-dns"})
NODELOCAL_DNS = Endpoint(ip="169.254.20.10")  # NodeLocal DNSCache's usual address (hostNetwork pods)
METADATA = [Endpoint(ip="169.254.169.254"), Endpoint(ip="fd00:ec2::254")]
INTERNET = [Endpoint(ip="140.82.112.3"), Endpoint(ip="2606:4700::6810:85e5")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Per overlay: every NetworkPolicy (ours and the datastores'), and Krona's pods as Endpoints."""
    tree, _ = copy_with_secrets(tmp_path_factory.mktemp("deploy"))
    datastores = [o for o in kustomize(tree / "datastores") if o["kind"] == "NetworkPolicy"]
    result = {}
    for overlay in ("cpu", "gpu"):
        objects = kustomize(tree / "overlays" / overlay)
        policies = [o for o in objects if o["kind"] == "NetworkPolicy"] + datastores
        pods = {
            o["metadata"]["name"]: (o, Endpoint(KRONA, o["spec"]["template"]["metadata"]["labels"]))
            for o in objects if o["kind"] == "Deployment"
        }  # fmt: skip
        result[overlay] = (objects, policies, pods)
    return result


def _container_port(deployment: dict, name: str) -> int:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return next(p["containerPort"] for p in container.get("ports", []) if p["name"] == name)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_ingress_reaches_the_gateway_from_the_controller_and_metrics_from_prometheus_only(cluster, overlay):
    _, policies, pods = cluster[overlay]
    gateway, gateway_pod = pods["krona-gateway"]
    http = _container_port(gateway, "http")
    assert allowed(policies, INGRESS_NGINX, gateway_pod, http)
    assert allowed(policies, PROMETHEUS, gateway_pod, http)  # /metrics (with KRONA_METRICS_TOKEN)
    for other in (GRAFANA, STRANGER, KEDA_OPERATOR):
        assert not allowed(policies, other, gateway_pod, http), other.pod
    for name in ("krona-worker-train", "krona-worker-infer"):
        worker, worker_pod = pods[name]
        port = _container_port(worker, "metrics")
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        assert {e["name"]: e.get("value") for e in container["env"]}["KRONA_WORKER_METRICS_PORT"] == str(port)
        assert allowed(policies, PROMETHEUS, worker_pod, port)
        assert not allowed(policies, INGRESS_NGINX, worker_pod, port)
        assert not allowed(policies, GRAFANA, worker_pod, port)
    # Nothing else takes connections: not the webhook worker, not krona-keda-role, not the gateway's other ports.
    for name in ("krona-webhooks", "krona-keda-role", "krona-worker-train"):
        for source in (INGRESS_NGINX, PROMETHEUS, STRANGER):
            assert not allowed(policies, source, pods[name][1], 8000)
    assert not allowed(policies, INGRESS_NGINX, gateway_pod, 9400)
    # And between Krona's own pods: nothing (none of them calls another).
    assert not allowed(policies, pods["krona-webhooks"][1], gateway_pod, http)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_egress_allows_dns_with_or_without_nodelocal_dnscache_and_never_instance_metadata(cluster, overlay):
    _, policies, pods = cluster[overlay]
    for name, (_, pod) in pods.items():
        for protocol in ("UDP", "TCP"):
            assert allowed(policies, pod, KUBE_DNS, 53, protocol), name
            assert allowed(policies, pod, NODELOCAL_DNS, 53, protocol), name
        assert not allowed(policies, pod, NODELOCAL_DNS, 8080), name  # DNS only, on that address
        for metadata in METADATA:
            for port in (80, 443, 53):
                assert not allowed(policies, pod, metadata, port), (name, metadata.ip)
        for address in INTERNET:  # the Hub, S3, webhook receivers
            assert allowed(policies, pod, address, 443), (name, address.ip)


def _example(name: str) -> dict[str, str]:
    lines = (K8S / "base" / name).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_datastores_take_exactly_the_connections_krona_and_keda_make(cluster, overlay):
    """Item 1 of issue 22: KEDA's PostgreSQL scaler connects to the port of its URL (keda.env); the datastores'
    policy allowed KEDA only Redis's port, so the train workers (minReplicaCount 0) never started."""
    objects, policies, pods = cluster[overlay]
    secrets, keda = _example("secrets.env.example"), _example("keda.env.example")
    config = find(objects, "ConfigMap", "krona-config")["data"]
    urls = {
        "postgres": urlparse(secrets["KRONA_DATABASE_URL"]),
        "redis": urlparse(secrets["KRONA_BROKER_URL"]),
        "minio": urlparse(config["KRONA_S3_ENDPOINT"]),
    }
    datastores = {}
    for name, url in urls.items():
        assert url.hostname.endswith(".krona-data.svc"), url  # the examples point into the datastores' namespace
        datastores[name] = (Endpoint(DATA, {"app.kubernetes.io/name": name}), url.port)
    keda_url = urlparse(keda["POSTGRES_CONNECTION"])
    assert keda_url.hostname == urls["postgres"].hostname and keda_url.port == urls["postgres"].port

    postgres, postgres_port = datastores["postgres"]
    assert allowed(policies, KEDA_OPERATOR, postgres, keda_url.port)
    for name, (store, port) in datastores.items():
        for krona in ("krona-gateway", "krona-worker-train", "krona-worker-infer", "krona-webhooks"):
            assert allowed(policies, pods[krona][1], store, port), (krona, name)
        assert not allowed(policies, STRANGER, store, port), name
        if name != "postgres":  # KEDA and the role setup need the database only
            assert not allowed(policies, KEDA_OPERATOR, store, port), name
            assert not allowed(policies, pods["krona-keda-role"][1], store, port), name
    assert allowed(policies, pods["krona-keda-role"][1], postgres, postgres_port)
    # The datastores' policy is in the file deploy/README.md tells operators to apply.
    (policy,) = [p for p in policies if p["metadata"]["namespace"] == "krona-data"]
    assert policy == yaml.safe_load((K8S / "datastores/networkpolicy.yaml").read_text())


def test_the_evaluator_knows_the_semantics_it_is_asked_about():
    """A policy-less pod takes anything; a selected one only what a rule allows; ipBlock except; ports."""
    pod = Endpoint(KRONA, {"app": "x"})
    assert allowed([], STRANGER, pod, 1)
    deny = {"metadata": {"namespace": "krona"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert not allowed([deny], STRANGER, pod, 1)
    from_default = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "default"}}}
    allow_all_from_default = {
        "metadata": {"namespace": "krona"},
        "spec": {"podSelector": {"matchLabels": {"app": "x"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [from_default], "ports": [{"port": 80}]}]},
    }  # fmt: skip
    assert allowed([deny, allow_all_from_default], STRANGER, pod, 80)
    assert not allowed([deny, allow_all_from_default], STRANGER, pod, 81)
    assert not allowed([deny, allow_all_from_default], STRANGER, pod, 80, "UDP")
    egress = {"metadata": {"namespace": "krona"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}]}]}}  # fmt: skip
    assert allowed([egress], pod, INTERNET[0], 443) and not allowed([egress], pod, METADATA[0], 80)
    assert not allowed([egress], pod, INTERNET[1], 443)  # no IPv6 block: refused
