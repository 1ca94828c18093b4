"""Waiting for a job on the server, shown on stderr: its phase (queued with its place in the queue, loading model,
class images, training, evaluating, uploading), a bar with the server's one ETA, and how to wait again after
Ctrl-C.

On a terminal one line is redrawn (twice a second, so elapsed times and the ETA count down between events); when
stderr is not a terminal, a line is printed per phase and per tenth of the steps.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from services.cli.connection import CliError, WaitInterrupted

__all__ = ["Display", "wait_batch", "wait_generation", "wait_training"]

PHASE_LABELS = {
    "queued": "queued",
    "loading_model": "loading the model",
    "class_images": "generating class images",
    "training": "training",
    "evaluating": "evaluating the adapter",
    "uploading": "storing the adapter",
    "canceling": "canceling (it stops at its next step)",
    "generating": "generating",
    "running": "generating",
}
BAR_WIDTH = 24


def duration(seconds: float | None) -> str:
    """'42s', '3m05s', '1h02m'."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def bar(done: float, total: float) -> str:
    fraction = 0.0 if not total else max(0.0, min(1.0, done / total))
    filled = round(fraction * BAR_WIDTH)
    return "█" * filled + "░" * (BAR_WIDTH - filled)


def queue_text(position: int | None) -> str:
    """The server's queue position (1 = next among the tenant's queued jobs of the kind)."""
    if position is None:
        return "queued"
    return "queued, next in line" if position <= 1 else f"queued, {position - 1} ahead of it"


class Display:
    """One job's state on stderr. ``render(now)`` returns (line, milestone); a new milestone prints a line when
    stderr is not a terminal."""

    def __init__(self, label: str, render: Callable[[Any, float], tuple[str, Any]], stream=None) -> None:
        self.label = label
        self.render = render
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.state: Any = None
        self.milestone: Any = object()
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, name="krona-progress", daemon=True)
            self._ticker.start()

    def update(self, state: Any) -> None:
        with self._lock:
            self.state = state
            self._draw(force_line=True)

    def _tick(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                if self.state is not None:
                    self._draw(force_line=False)

    def _draw(self, force_line: bool) -> None:
        if getattr(self.state, "done", False):
            return  # the end is said by the summary line that follows
        line, milestone = self.render(self.state, time.monotonic())
        text = f"{self.label}  {line}"
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r\033[K" + text[:width])
            self.stream.flush()
        elif force_line and milestone != self.milestone:
            self.milestone = milestone
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=1)
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


class TrainingView:
    """Renders a Training: the server's phase (or one derived from status and step) and the server's ETA,
    counted down between reports."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.phase_since = time.monotonic()
        self.eta_at: tuple[float, float] | None = None  # (eta_seconds, when reported)
        self.reported: tuple | None = None

    def __call__(self, training: Any, now: float) -> tuple[str, Any]:
        phase = training.phase
        if phase != self.phase:
            self.phase, self.phase_since = phase, now
        progress = training.progress
        key = (progress.step, progress.eta_seconds)
        if key != self.reported:
            self.reported = key
            self.eta_at = (progress.eta_seconds, now) if progress.eta_seconds is not None else None
        if phase == "queued":
            return f"{queue_text(training.position)}  {duration(now - self.phase_since)}", ("queued",)
        if phase == "training" and progress.total_steps:
            eta = None if self.eta_at is None else self.eta_at[0] - (now - self.eta_at[1])
            loss = f"  loss {progress.loss:.4f}" if progress.loss is not None else ""
            line = f"training  {bar(progress.step, progress.total_steps)} {progress.step}/{progress.total_steps} steps"
            tenth = progress.step * 10 // progress.total_steps
            return f"{line}{loss}  ETA {duration(eta)}", ("training", tenth)
        label = PHASE_LABELS.get(phase, phase.replace("_", " "))
        return f"{label}…  {duration(now - self.phase_since)}", (phase,)


class GenerationView:
    def __init__(self) -> None:
        self.phase: str | None = None
        self.phase_since = time.monotonic()

    def __call__(self, generation: Any, now: float) -> tuple[str, Any]:
        phase = generation.phase
        if phase != self.phase:
            self.phase, self.phase_since = phase, now
        elapsed = duration(now - self.phase_since)
        if phase == "queued":
            return f"{queue_text(generation.position)}  {elapsed}", ("queued",)
        if phase in ("generating", "running"):
            what = f"{generation.num_images} image{'s' if generation.num_images != 1 else ''}"
            shape = f"{generation.width}x{generation.height}, {generation.steps} steps"
            return f"generating {what} ({shape})…  {elapsed}", (phase,)
        return f"{PHASE_LABELS.get(phase, phase.replace('_', ' '))}…  {elapsed}", (phase,)


def render_batch(batch: Any, now: float) -> tuple[str, Any]:
    counts = batch.counts
    finished = batch.finished
    line = f"{bar(finished, batch.total)} {finished}/{batch.total} generations"
    shown = ("queued", "running", "canceling", "failed", "canceled")
    detail = ", ".join(f"{counts[s]} {s}" for s in shown if counts.get(s))
    tenth = finished * 10 // batch.total if batch.total else 0
    return line + (f"  ({detail})" if detail else ""), tenth


def _waiter(collection: str, noun: str, view: Callable[[], Callable], *, cancel_hint: bool = False) -> Callable:
    """``wait(client, job_id)``: follow a job of ``collection`` (the SDK's attribute, the command group) to its end
    with its progress on stderr (``view()`` renders it); Ctrl-C stops the waiting, saying how to wait again."""

    def wait(client: Any, job_id: str) -> Any:
        display = Display(job_id, view())
        try:
            return getattr(client, collection).wait(job_id, on_progress=display.update)
        except KeyboardInterrupt:
            display.close()
            resume = f"krona {collection} wait {job_id}"
            if cancel_hint:
                resume += f"  (stop it: krona {collection} cancel {job_id})"
            raise WaitInterrupted(
                f"stopped waiting; {noun} {job_id} goes on on the server. Wait again: {resume}"
            ) from None
        finally:
            display.close()

    return wait


# Follow a training (event stream, else polling) with its phase, a generation, a batch with its counts.
wait_training = _waiter("trainings", "training", TrainingView, cancel_hint=True)
wait_generation = _waiter("generations", "generation", GenerationView)
wait_batch = _waiter("batches", "batch", lambda: render_batch)


def summary(kind: str, resource: Any, started: float) -> str:
    """The line that says how a job ended (stderr)."""
    took = duration(time.monotonic() - started)
    status = getattr(resource, "status", "?")
    line = f"{kind} {resource.id} {status} after {took}"
    error = getattr(resource, "error", None)
    if error is not None:
        line += f": {error.code}: {error.message}"
    return line


def exit_status(resource: Any) -> int:
    """0 when the job succeeded, 1 otherwise (failed or canceled)."""
    return 0 if getattr(resource, "status", None) == "succeeded" else 1


def require_done(resource: Any, what: str) -> None:
    if not resource.done:
        raise CliError(f"{what} {resource.id} is {resource.status}; wait for it: krona {what}s wait {resource.id}")
