"""`krona up`'s child processes, kept running: a child that dies is started again with backoff.

The supervisor writes its view to ``<data dir>/processes.json`` (name, pid, state, restarts, last exit
code) so that the gateway's `/readyz` can say whether the workers are running or being restarted.

Stopping sends SIGTERM to every child at once and waits up to each child's ``stop_timeout`` before SIGKILL:
a job worker drains in that time (workers/drain.py: a training checkpoints and hands over, a batch finishes),
so a worker gets a longer wait than the gateway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared.supervision import STATE_FILE

__all__ = ["Child", "Supervisor"]
MAX_BACKOFF_SECONDS = 30.0
# A child that ran this long before dying starts again at once (its backoff is reset).
HEALTHY_AFTER_SECONDS = 60.0


@dataclass
class Child:
    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    backoff: float = field(default=1.0)
    # Seconds between SIGTERM and SIGKILL when the supervisor stops (a worker drains in this time).
    stop_timeout: float = 20.0

    @property
    def state(self) -> str:
        if self.process is not None and self.process.poll() is None:
            return "running"
        return "restarting" if self.restart_at is not None else "stopped"


class Supervisor:
    """Start the children; ``check()`` restarts dead ones; ``stop()`` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self, children: list[Child], state_dir: Path) -> None:
        self.children = children
        self.state_file = state_dir / STATE_FILE

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._write_state()

    def _spawn(self, child: Child) -> None:
        child.process = subprocess.Popen(child.command, env=child.env)
        child.started_at = time.monotonic()
        child.restart_at = None

    def check(self) -> None:
        """Notice exits and start children whose backoff is over (call it every fraction of a second)."""
        now = time.monotonic()
        changed = False
        for child in self.children:
            if child.process is not None and child.restart_at is None and child.process.poll() is not None:
                child.last_exit_code = child.process.returncode
                if now - child.started_at >= HEALTHY_AFTER_SECONDS:
                    child.backoff = 1.0
                child.restart_at = now + child.backoff
                print(
                    f"krona up: {child.name} exited with {child.last_exit_code}; restarting in {child.backoff:g} s",
                    file=sys.stderr,
                    flush=True,
                )
                child.backoff = min(MAX_BACKOFF_SECONDS, child.backoff * 2)
                changed = True
            elif child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)
                print(f"krona up: {child.name} started again (restart {child.restarts})", file=sys.stderr, flush=True)
                changed = True
        if changed:
            self._write_state()

    def run_until_signal(self) -> None:
        """Keep the children running until SIGINT or SIGTERM, then stop them all."""
        import signal

        stopping = False

        def stop(_signum=None, _frame=None) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping:
                self.check()
                time.sleep(0.3)
        finally:
            self.stop()

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to every child, then wait for each up to its ``stop_timeout`` (or ``timeout``) and SIGKILL."""
        started = time.monotonic()
        for child in self.children:
            child.restart_at = None
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()
        for child in self.children:
            if child.process is None:
                continue
            deadline = started + (child.stop_timeout if timeout is None else timeout)
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"krona up: {child.name} did not stop in time; killing it", file=sys.stderr, flush=True)
                child.process.kill()
                child.process.wait()
            child.last_exit_code = child.process.returncode
        self._write_state()

    def _write_state(self) -> None:
        states = {
            child.name: {
                "pid": child.process.pid if child.process is not None else None,
                "state": child.state,
                "restarts": child.restarts,
                "last_exit_code": child.last_exit_code,
            }
            for child in self.children
        }
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(states))
        os.replace(temporary, self.state_file)
