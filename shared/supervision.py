"""What `krona up` tells the gateway about its child processes (``<data dir>/processes.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["STATE_FILE", "read_process_states"]

STATE_FILE = "processes.json"


def read_process_states(data_dir: Path) -> dict[str, dict[str, Any]] | None:
    """Name -> {pid, state (running, restarting, stopped), restarts, last_exit_code}, or None outside `krona up`."""
    try:
        states = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return states if isinstance(states, dict) else None
