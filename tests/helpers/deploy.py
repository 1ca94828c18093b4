"""Rendering the Kubernetes overlays (deploy/k8s) for the deployment tests."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


K8S = ROOT / "deploy/k8s"


OVERLAYS = ("cpu", "gpu")


# The Kubernetes versions the manifests are validated against: the oldest supported one and the newest schemas
# kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.30", "1.37")


SECRET_FILES = ("secrets.env", "keda.env")  # git-ignored, made from the *.env.example files next to them


def kustomize(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the Kustomize overlays"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def copy_with_secrets(destination: Path) -> tuple[Path, dict[str, str]]:
    """deploy/k8s copied to ``destination`` with the secret files an operator writes: every value of the
    examples replaced by a random one (the copy leaves out any real secret files of this checkout)."""
    tree = destination / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns(*SECRET_FILES))
    values = {}
    for name in SECRET_FILES:
        lines = []
        for line in (tree / "base" / f"{name}.example").read_text().splitlines():
            if line and not line.startswith("#"):
                key, _ = line.split("=", 1)
                values[key] = f"test-{secrets.token_hex(8)}"
                line = f"{key}={values[key]}"
            lines.append(line)
        (tree / "base" / name).write_text("\n".join(lines) + "\n")
    return tree, values


def find(objects, kind, name=None):
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert found, (kind, name)
    return found if name is None else found[0]


def pod_templates(objects):
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]["spec"]
