"""Tiers (pyproject.toml's markers), given to every test from the fixtures it uses and what its body starts."""

from __future__ import annotations

import pytest

E2E_FIXTURES = {"stack", "embedded_stack", "live_gateway", "stack_database"}


INTEGRATION_FIXTURES = {"postgres_url", "redis_url", "s3_server", "s3_storage", "api", "stack_s3", "hooks_runtime"}


# A fixture whose name says it (sqlite_local_api, postgres_s3_api, …), or a test parametrized on a database.
INTEGRATION_NAMES = ("postgres", "_api", "database", "s3")


MODEL_FIXTURES = {"tiny_folders", "model_cache", "tiny_unet"}


E2E_CALLS = ("KronaUp(", "start_gateway(", "gateway_load.py", '"services.cli.main", "up"')


# Heavier than a unit test, without services: building or running models, or starting processes.
MODEL_CALLS = ("load_components(", "build_tiny_unet(", "load_pipeline(", "ensure_tiny_model(", "subprocess", "Popen(")


def pytest_collection_modifyitems(config, items) -> None:
    import inspect

    sources: dict = {}
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        function = getattr(item, "function", None)
        if function not in sources:
            try:
                sources[function] = inspect.getsource(function) if function is not None else ""
            except (OSError, TypeError):
                sources[function] = ""
        body = sources[function]
        params = " ".join(str(v) for v in getattr(getattr(item, "callspec", None), "params", {}).values())
        if fixtures & E2E_FIXTURES or any(call in body for call in E2E_CALLS):
            item.add_marker(pytest.mark.e2e)
        elif (
            fixtures & INTEGRATION_FIXTURES
            or any(name in fixture for fixture in fixtures for name in INTEGRATION_NAMES)
            or "postgres" in params
            or "s3" in params
            or "postgres" in body
        ):
            item.add_marker(pytest.mark.integration)
        elif fixtures & MODEL_FIXTURES or any(call in body for call in MODEL_CALLS):
            item.add_marker(pytest.mark.models)
        else:
            item.add_marker(pytest.mark.unit)
