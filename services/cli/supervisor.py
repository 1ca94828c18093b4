"""`krona up`'s child processes, kept running: a child that dies is started again with backoff.

The supervisor writes its view to ``<data dir>/processes.json`` (name, pid, state, restarts, last exit
code) so that the gateway's `/readyz` can say whether the workers are running or being restarted.

Each child runs in a process group of its own, so a Ctrl-C on the terminal reaches only the supervisor, which
then stops the children once, in order (a second signal to a Celery worker would be a cold shutdown and lose the
drain). A child also gets SIGTERM if the supervisor dies (Linux: PR_SET_PDEATHSIG), so none is left behind.

A child with a ``log_file`` writes its output there; the lines that ``to_terminal`` picks (warnings and errors)
are also shown on the terminal, prefixed with the child's name.

Stopping sends SIGTERM to every child at once and waits up to each child's ``stop_timeout`` before SIGKILL:
a job worker drains in that time (workers/drain.py: a training checkpoints and hands over, a batch finishes),
so a worker gets a longer wait than the gateway. A second Ctrl-C (or SIGTERM) while stopping kills them at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from shared.supervision import STATE_FILE

__all__ = ["Child", "Supervisor"]
MAX_BACKOFF_SECONDS = 30.0
# A child that ran this long before dying starts again at once (its backoff is reset).
HEALTHY_AFTER_SECONDS = 60.0
POLL_SECONDS = 0.1


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - not Linux
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None
PR_SET_PDEATHSIG = 1


def _own_group_and_die_with_parent() -> None:
    """In the child, before exec: a process group of its own (Ctrl-C on the terminal is the supervisor's), and
    SIGTERM when the supervisor dies."""
    os.setpgid(0, 0)
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


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
    # Where the child's stdout and stderr go (None: the supervisor's own), and which lines also reach the terminal.
    log_file: Path | None = None
    to_terminal: Callable[[str, bool], bool] | None = None
    # Killed without a word when its stop_timeout ends (a child whose work survives a kill: webhook deliveries).
    quiet_kill: bool = False
    # Asked when stopping: True when the child has no work in flight, so that it may be killed after
    # ``idle_stop_timeout`` (an idle Celery worker takes seconds to notice SIGTERM; nothing is lost by a kill).
    idle: Callable[[], bool] | None = None
    idle_stop_timeout: float = 1.0
    _pump: threading.Thread | None = None

    @property
    def state(self) -> str:
        if self.process is not None and self.process.poll() is None:
            return "running"
        return "restarting" if self.restart_at is not None else "stopped"


def _pump_output(child: Child, source: IO[bytes], log: IO[bytes], terminal: IO[str]) -> None:
    """Copy the child's output to its log file; the lines ``to_terminal`` picks also to the terminal."""
    shown = False
    for raw in iter(source.readline, b""):
        log.write(raw)
        log.flush()
        line = raw.decode("utf-8", "replace").rstrip("\n")
        shown = child.to_terminal(line, shown) if child.to_terminal is not None else True
        if shown:
            with contextlib.suppress(ValueError, OSError):
                terminal.write(f"{child.name}: {line}\n")
                terminal.flush()
    source.close()


class Supervisor:
    """Start the children; ``check()`` restarts dead ones; ``stop()`` ends them all (SIGTERM, then SIGKILL)."""

    def __init__(self, children: list[Child], state_dir: Path) -> None:
        self.children = children
        self.state_file = state_dir / STATE_FILE
        self._signals = 0

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._write_state()

    def _spawn(self, child: Child) -> None:
        if child.log_file is None:
            child.process = subprocess.Popen(child.command, env=child.env, preexec_fn=_own_group_and_die_with_parent)
        else:
            child.log_file.parent.mkdir(parents=True, exist_ok=True)
            log = open(child.log_file, "ab")  # noqa: SIM115 - closed when the child's output ends
            child.process = subprocess.Popen(
                child.command,
                env=child.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                preexec_fn=_own_group_and_die_with_parent,
            )

            def pump(process=child.process, log=log) -> None:
                try:
                    _pump_output(child, process.stdout, log, sys.stderr)
                finally:
                    log.close()

            child._pump = threading.Thread(target=pump, name=f"krona-up-{child.name}-log", daemon=True)
            child._pump.start()
        child.started_at = time.monotonic()
        child.restart_at = None

    def _where_logs(self, child: Child) -> str:
        return f" (its log: {child.log_file})" if child.log_file is not None else ""

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
                    f"krona up: {child.name} exited with {child.last_exit_code}; restarting in {child.backoff:g} s"
                    + self._where_logs(child),
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

    def _on_signal(self, _signum=None, _frame=None) -> None:
        self._signals += 1

    def run_until_signal(self, ready: Callable[[], bool] | None = None, on_ready: Callable[[], None] | None = None):
        """Keep the children running until SIGINT or SIGTERM, then stop them all. ``ready()`` is asked every half
        second until it is true; then ``on_ready()`` runs once."""
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        next_probe = 0.0
        try:
            while not self._signals:
                self.check()
                if ready is not None and time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + 0.5
                    if ready():
                        ready = None
                        if on_ready is not None:
                            on_ready()
                time.sleep(POLL_SECONDS)
            waits = [c.stop_timeout for c in self.children if c.process is not None and c.process.poll() is None]
            print(
                f"krona up: stopping (a running training checkpoints first; at most {max(waits, default=0):g} s); "
                "Ctrl-C again stops at once",
                file=sys.stderr,
                flush=True,
            )
        finally:
            self.stop()

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM to every child, then wait for each up to its ``stop_timeout`` (or ``timeout``) and SIGKILL.
        A signal that comes while waiting (a second Ctrl-C) kills the children at once."""
        started = time.monotonic()
        signals_before = self._signals
        limits: dict[str, tuple[float, bool]] = {}
        for child in self.children:
            limit, quiet = (child.stop_timeout if timeout is None else timeout), child.quiet_kill
            if child.idle is not None and timeout is None and child.process is not None:
                with contextlib.suppress(Exception):  # unknown: the full drain window
                    if child.idle():
                        limit, quiet = min(limit, child.idle_stop_timeout), True
            limits[child.name] = (limit, quiet)
        for child in self.children:
            child.restart_at = None
            if child.process is not None and child.process.poll() is None:
                child.process.terminate()
        forced = False
        while True:
            alive = [c for c in self.children if c.process is not None and c.process.poll() is None]
            if not alive:
                break
            now = time.monotonic()
            if not forced and self._signals > signals_before:
                forced = True
                print("krona up: stopping at once", file=sys.stderr, flush=True)
            for child in alive:
                limit, quiet = limits[child.name]
                if forced or now - started >= limit:
                    if not forced and not quiet:
                        print(f"krona up: {child.name} did not stop in time; killing it", file=sys.stderr, flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
                    child.process.wait()
            time.sleep(POLL_SECONDS)
        for child in self.children:
            if child.process is not None:
                child.last_exit_code = child.process.returncode
            if child._pump is not None:
                child._pump.join(timeout=2)
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
