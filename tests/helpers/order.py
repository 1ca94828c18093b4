"""The longest test files first. `make test` runs files on three xdist processes (`--dist loadfile`: a file's tests
in one process, in order), handing out files in collection order: a long file collected last runs alone while the
other processes idle. Starting the longest first (the LPT rule) shortens the run: the order below is by the seconds
each file took in `make test` on the 2-core VM (2026-12-04, `--durations`; kept by hand); the rest keep their order."""

from __future__ import annotations

from pathlib import Path

LONGEST_FIRST = (
    "test_drain.py",  # ~85 s: workers started, SIGTERM and resumes
    "test_cli_service.py",  # ~65 s: a `krona up` stack and the CLI against it
    "test_schemathesis.py",  # ~55 s
    "test_embedded.py",  # ~55 s
    "test_console_browser.py",  # ~40 s
    "test_cli_errors.py",  # ~40 s
    "test_service_e2e.py",  # ~35 s
    "test_outages.py",  # ~35 s
    "test_fairness.py",  # ~45 s: 64 generations on the embedded stack (was 200: ~85 s)
    "test_readme.py",  # ~30 s
    "test_continuous_batching.py",  # ~30 s
    "test_gpu_suite.py",  # ~30 s
    "test_eval_api.py",  # ~25 s
    "test_sdk.py",  # ~25 s
    "test_generated_client.py",  # ~25 s
    "test_webhooks.py",  # ~25 s
)


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.path)).name, len(rank)))  # stable: the rest keep their order
