"""docker compose, checked the way compose selects services (no Docker engine here): for every profile and every
service selected alone, each selected service's image is built by the command or is a published image; the
PostgreSQL healthcheck is the one the other services' connections need; and the build context (.dockerignore)
holds what the Dockerfiles copy and never a secrets file."""

import re
import subprocess

import pytest
import yaml
from helpers.deploy import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROFILES = sorted({p for s in SERVICES.values() for p in s.get("profiles", [])})
# Images of other publishers the stack runs, pinned: each exists on Docker Hub under this tag (the official
# postgres and redis images, MinIO's server and client release tags).
PUBLISHED = {
    "postgres:16.6-bookworm",
    "redis:7.4.2-bookworm",
    "minio/minio:RELEASE.2025-01-20T14-49-07Z",
    "minio/mc:RELEASE.2025-01-17T23-25-50Z",
}


def _depends_on(service: dict) -> dict[str, dict]:
    deps = service.get("depends_on", {})
    return {name: {} for name in deps} if isinstance(deps, list) else deps


def selected(profiles: tuple[str, ...] = (), services: tuple[str, ...] = ()) -> set[str]:
    """The services `docker compose [--profile P]... up [SERVICE...]` starts, by compose's documented rules: a
    service without `profiles` is always enabled, one with profiles when one of them is active; naming a service
    on the command line enables it whatever its profiles; `depends_on` brings in each dependency, which must be
    enabled (compose refuses a required dependency on a disabled service); with no service named, every enabled
    service starts."""

    def enabled(name: str) -> bool:
        wanted = SERVICES[name].get("profiles")
        return not wanted or bool(set(wanted) & set(profiles)) or name in services

    todo = list(services) if services else [name for name in SERVICES if enabled(name)]
    closure: set[str] = set()
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        for dependency, condition in _depends_on(SERVICES[name]).items():
            if not enabled(dependency):
                assert condition.get("required") is False, f"{name} depends on {dependency}, not enabled by {profiles}"
                continue
            todo.append(dependency)
    return closure


def _repository(image: str) -> str:
    """The image's name without its tag (``krona-worker:${KRONA_VERSION:-latest}`` -> ``krona-worker``)."""
    return re.match(r"[^:$]+(:\d+/[^:$]+)?", image).group(0)


BUILT = {_repository(s["image"]): s["build"] for s in SERVICES.values() if "build" in s}

SELECTIONS = [(profiles, ()) for profiles in [(), *((p,) for p in PROFILES)]] + [
    (profiles, (name,)) for name in SERVICES for profiles in [(), *((p,) for p in PROFILES)]
]


@pytest.mark.parametrize(("profiles", "services"), SELECTIONS, ids=lambda v: ",".join(v) or "-")
def test_every_selection_builds_or_pulls_an_image_that_exists(profiles, services):
    """Issue 22 item 3: `docker compose up worker-infer` (or the cpu profile's worker-cpu) dropped worker-train,
    the only service that built krona-worker, and compose tried to pull krona-worker:latest from Docker Hub."""
    chosen = selected(profiles, services)
    assert set(services) <= chosen
    built_here = {_repository(SERVICES[name]["image"]) for name in chosen if "build" in SERVICES[name]}
    for name in chosen:
        image = SERVICES[name]["image"]
        if _repository(image) in BUILT:
            assert _repository(image) in built_here, f"{name}: nothing selected builds {image}"
        else:
            assert image in PUBLISHED, f"{name}: {image} is neither built here nor a known published image"


def test_the_selection_rules_match_the_documented_commands():
    """The commands of the compose file's header and deploy/README.md start what they say."""
    everything = {name for name, s in SERVICES.items() if "profiles" not in s}
    assert selected() == everything and "worker-cpu" not in everything
    cpu = ("postgres", "redis", "minio", "minio-init", "migrate", "gateway", "worker-cpu")
    assert selected(("cpu",), cpu) == set(cpu)
    assert selected((), ("worker-infer",)) == {"worker-infer", "migrate", "postgres", "redis", "minio", "minio-init"}
    assert selected((), ("worker-cpu",)) >= {"worker-cpu", "migrate"}  # named: its profile is enabled
    assert "docker compose --profile cpu up -d " + " ".join(cpu) in (ROOT / "docker-compose.yml").read_text()


def test_every_service_on_a_krona_image_builds_it_the_same_way():
    """Not only some selection: any service run alone (`docker compose run migrate`) has its build, and the
    services of one image build it from the same Dockerfile."""
    assert set(BUILT) == {"krona-gateway", "krona-worker"}
    for name, service in SERVICES.items():
        repository = _repository(service["image"])
        if repository in BUILT:
            assert service.get("build") == BUILT[repository], name
            assert service["image"].endswith(":${KRONA_VERSION:-latest}"), name
            dockerfile = ROOT / service["build"]["dockerfile"]
            assert dockerfile.exists() and repository.removeprefix("krona-") in dockerfile.name


def test_postgres_is_healthy_only_when_it_accepts_tcp_connections():
    """The image's first start initialises the database with a temporary server on the Unix socket only; a
    pg_isready on the socket passed then, and `migrate` (which connects over TCP, as everything does) failed."""
    postgres = SERVICES["postgres"]
    test = postgres["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready"
    args = test[2:]
    assert args[args.index("-h") + 1] == "127.0.0.1" and args[args.index("-p") + 1] == "5432"
    assert "5432" in SERVICES["migrate"]["environment"]["KRONA_DATABASE_URL"]
    # Room for the first start's initialisation, checked often meanwhile.
    assert postgres["healthcheck"]["start_period"] == "120s" and postgres["healthcheck"]["start_interval"] == "1s"
    for name, service in SERVICES.items():
        if "postgres" in _depends_on(service):
            assert _depends_on(service)["postgres"]["condition"] == "service_healthy", name
    # The pg_isready of the image's version accepts these options (the same program as this machine's client).
    result = subprocess.run(["pg_isready", *args[:4], "-t", "5"], capture_output=True, text=True)
    assert result.returncode in (0, 1, 2), result.stderr  # 3 would mean bad options


# .dockerignore, matched as Docker matches it (moby/patternmatcher): patterns in order, the last one that matches a
# path or one of its parent folders decides; '!' re-includes; '*' and '?' stay within a path segment, '**' spans.


def _dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((exclude, re.compile(regex + r"\Z")))
    return rules


def in_context(path: str, dockerignore: str | None = None) -> bool:
    text = (ROOT / ".dockerignore").read_text() if dockerignore is None else dockerignore
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exclude, regex in _dockerignore_rules(text):
        if any(regex.match(prefix) for prefix in prefixes):
            included = not exclude
    return included


def _repository_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True)  # fmt: skip
    return [line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]


def test_the_build_context_holds_what_the_dockerfiles_copy_and_no_secrets():
    files = _repository_files()
    context = [f for f in files if in_context(f)]
    # Every COPY source of both Dockerfiles is in the context (a file, or a folder with files).
    for dockerfile in sorted((ROOT / "deploy/docker").glob("*.Dockerfile")):
        for source in re.findall(r"^COPY (\S+) ", dockerfile.read_text(), re.M):
            assert any(f == source or f.startswith(source + "/") for f in context), (dockerfile.name, source)
    # Nothing but those: no tests, no virtual environment, no git history, no caches.
    copied = ("shared/", "services/", "workers/", "migrations/", "alembic.ini", "deploy/docker/requirements-")
    assert all(f.startswith(copied) for f in context), [f for f in context if not f.startswith(copied)]
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in context)
    # The secrets files, wherever an operator puts them (they are git-ignored, so checked by name).
    for secret in (".env", "deploy/k8s/base/secrets.env", "deploy/k8s/base/keda.env", "services/gateway/.env",
                   "shared/secrets.env", "workers/.env.local", "migrations/keda.env", ".git/config", ".venv/bin/python",
                   "tests/conftest.py", "shared/__pycache__/x.cpython-311.pyc"):  # fmt: skip
        assert not in_context(secret), secret
    for needed in ("shared/db/models.py", "alembic.ini", "deploy/docker/requirements-worker.txt"):
        assert in_context(needed), needed


def test_the_dockerignore_matcher_follows_docker():
    """The matcher above on the examples of Docker's documentation of .dockerignore."""
    examples = "# comment\n*/temp*\n*/*/temp*\ntemp?\n**/*.go\n"
    for path, included in (("somedir/temporary.txt", False), ("somedir/temp/x", False), ("temporary.txt", True),
                           ("somedir/subdir/temporary.txt", False), ("tempa", False), ("tempab", True),
                           ("a/b/c/main.go", False), ("main.go", False), ("main.py", True)):  # fmt: skip
        assert in_context(path, examples) is included, path
    readmes = "*.md\n!README*.md\nREADME-secret.md\n"
    for path, included in (("CHANGES.md", False), ("README.md", True), ("README-secret.md", False)):
        assert in_context(path, readmes) is included, path
    # An exception re-includes a file below an excluded folder (the allow-list of this repository relies on it).
    assert in_context("deploy/docker/requirements-gateway.txt") and not in_context("deploy/docker/gateway.Dockerfile")
