"""A newcomer's first minutes: from a fresh clone, following README.md literally, how long until the first trained
adapter and the first image (the goal: under 3 minutes, install included).

    python benchmarks/newcomer.py [--json benchmarks/results/newcomer.json] [--keep] [--source DIR]

Steps, each timed: a fresh clone of this repository (or, when the working tree has changes, a copy of the files
git would commit, so that what is measured is what would be pushed); the README's Quick start block (`make demo`:
the install, then the demo, which trains the first adapter and makes the first images, timed from its output;
`source .venv/bin/activate`; `krona --help`); `krona up` from the walk-through, until it
says it is up; the walk-through's client block, one command at a time in one bash (its variables carry over); Ctrl-C
(SIGINT) to `krona up`, until it has stopped. The blocks are read from README.md at run time (the markers
`<!-- readme-test: … -->`, as tests/test_readme.py reads them). The clone's install uses the pip cache and the
local wheels the Makefile names, as anyone's on this machine would.

Prints a table and writes JSON with the machine (CPU count and model, load before and after), the commit and the
mode (clone or copy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```bash\n(.*?)```", re.S)
GOAL_SECONDS = 180.0


def marked_block(readme: str, name: str) -> str:
    marker = f"<!-- readme-test: {name} -->"
    match = FENCE.search(readme, readme.index(marker))
    return match.group(1)


def commands(block: str) -> list[str]:
    """The block's command lines as bash reads them: continuation lines joined, blank and comment-only lines
    dropped (a trailing comment stays; bash ignores it)."""
    lines = (line.strip() for line in block.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def short_label(command: str) -> str:
    """The command without its trailing comment, shortened for the table."""
    words = shlex.split(command, comments=True)
    text = " ".join(words) if words else command
    return text if len(text) <= 60 else text[:57] + "..."


def fresh_checkout(source: Path, target: Path) -> str:
    """A clone of ``source`` when its tree is clean, else a copy of the files git would commit (a folder that is
    not a git repository: its files, without .venv, .krona, out and caches); the mode."""
    if not (source / ".git").exists():
        ignore = shutil.ignore_patterns(".venv", ".krona", "out", "__pycache__", "*.egg-info", ".pytest_cache")
        shutil.copytree(source, target, ignore=ignore, symlinks=False)
        return f"copy of {source} (not a git repository)"
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True, text=True).stdout
    if not dirty.strip():
        subprocess.run(["git", "clone", "--quiet", str(source), str(target)], check=True)
        return "clone"
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, listed):
        path = source / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            destination = target / os.fsdecode(name)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination)
    return "copy of the working tree (uncommitted changes)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env() -> dict[str, str]:
    """The shell of someone who just cloned: no KRONA_* settings, no virtualenv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") and k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if "/.venv/" not in p)
    return env


def run_block_timed(lines: list[str], cwd: Path, env: dict[str, str], log) -> list[tuple[str, float, float]]:
    """Run ``lines`` in one bash (set -e), one after the other; (command, start, end) of each (monotonic)."""
    script = ["set -euo pipefail", "source .venv/bin/activate"]
    for index, line in enumerate(lines):
        script += [f'echo "@@start {index} $(date +%s.%N)" >&2', line, f'echo "@@end {index} $(date +%s.%N)" >&2']
    offset = time.time() - time.monotonic()
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True)
    log.write(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"the client block failed ({result.returncode}):\n{result.stderr[-3000:]}")
    marks = {
        (kind, int(i)): float(t) - offset for kind, i, t in re.findall(r"@@(start|end) (\d+) ([\d.]+)", result.stderr)
    }
    return [(line, marks[("start", i)], marks[("end", i)]) for i, line in enumerate(lines)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/newcomer.json"), help="where the JSON goes")
    parser.add_argument("--keep", action="store_true", help="keep the fresh checkout (its path is printed)")
    parser.add_argument("--source", default=str(ROOT), help="the repository (or a folder) to start from")
    args = parser.parse_args()
    source = Path(args.source).resolve()

    readme = (source / "README.md").read_text(encoding="utf-8")
    quick_start = commands(marked_block(readme, "quick start"))
    (up_line,) = (" ".join(shlex.split(line, comments=True)) for line in commands(marked_block(readme, "krona up")))
    client = commands(marked_block(readme, "client"))
    workdir = Path(tempfile.mkdtemp(prefix="krona-newcomer-"))
    checkout = workdir / "krona"
    env = clean_env()
    load_before = os.getloadavg()
    timeline: list[tuple[str, float]] = []
    log = open(workdir / "newcomer.log", "w")  # noqa: SIM115
    start = time.monotonic()
    try:
        mode = fresh_checkout(source, checkout)
        timeline.append(("fresh checkout", time.monotonic() - start))

        # Quick start: make demo (install + demo), activate, --help; `make demo` timed alone too.
        # The demo's own steps are timed as its lines come: the install ends where the demo starts, and the demo
        # trains the first adapter and makes the first images.
        script = "set -euo pipefail\n" + "\n".join(quick_start)
        quick = subprocess.Popen(
            ["bash", "-c", script], cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        milestones = {
            "[1/6] starting the embedded stack": "make demo: installed (the demo starts)",
            "[3/6] training succeeded": "make demo: first trained adapter",
            "[4/6] generated": "make demo: first images",
            "demo finished in": "make demo: done",
        }
        output = []
        for line in quick.stdout:
            output.append(line)
            log.write(line)
            for prefix, name in milestones.items():
                if line.startswith(prefix):
                    timeline.append((name, time.monotonic() - start))
        if quick.wait() != 0:
            raise RuntimeError("the Quick start block failed:\n" + "".join(output)[-3000:])
        demo_seconds = re.search(r"demo finished in ([\d.]+) s", "".join(output))
        timeline.append(("Quick start done (source .venv/bin/activate, krona --help)", time.monotonic() - start))

        # krona up, as the README says (on a free port when 8000 is taken here).
        port = 8000
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", 8000)) == 0:
                port = free_port()
        up_command = up_line if port == 8000 else f"{up_line} --port {port}"
        up_log = open(workdir / "up.log", "w")  # noqa: SIM115
        up = subprocess.Popen(
            ["bash", "-c", f"source .venv/bin/activate && exec {up_command}"],
            cwd=checkout, env=env, stdout=up_log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            while "Krona is up" not in (workdir / "up.log").read_text():
                if up.poll() is not None:
                    raise RuntimeError(f"krona up exited:\n{(workdir / 'up.log').read_text()[-3000:]}")
                time.sleep(0.2)
            timeline.append(("krona up: up", time.monotonic() - start))
            client_env = {**env, "KRONA_URL": f"http://127.0.0.1:{port}"}
            for line, _began, ended in run_block_timed(client, checkout, client_env, log):
                timeline.append((short_label(line), ended - start))
        finally:
            stop_began = time.monotonic()
            up.send_signal(signal.SIGINT)  # Ctrl-C
            up.wait(timeout=180)
            stop_seconds = time.monotonic() - stop_began
            up_log.close()
    finally:
        log.close()
    total = time.monotonic() - start
    first_adapter = next(t for label, t in timeline if label == "make demo: first trained adapter")
    first_image = next(t for label, t in timeline if label == "make demo: first images")
    walkthrough_adapter = next(t for label, t in timeline if label.startswith("krona trainings create"))
    walkthrough_image = next(t for label, t in timeline if label.startswith("krona generations create"))

    rows = [(label, f"{t:8.1f}") for label, t in timeline]
    width = max(len(label) for label, _ in rows)
    print(f"{'step (README, literally)'.ljust(width)}  seconds from the start")
    for label, seconds in rows:
        print(f"{label.ljust(width)}  {seconds}")
    print(f"\nfirst trained adapter: {first_adapter:.1f} s, first image: {first_image:.1f} s (in make demo; goal "
          f"{GOAL_SECONDS:.0f} s, install included); in the walk-through: {walkthrough_adapter:.1f} s and "
          f"{walkthrough_image:.1f} s; Ctrl-C to stopped: {stop_seconds:.1f} s")  # fmt: skip

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    report = {
        "benchmark": "newcomer",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "mode": mode,
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu,
            "python": platform.python_version(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "seconds": {
            "first_trained_adapter": round(first_adapter, 1),
            "first_image": round(first_image, 1),
            "walkthrough_trained_adapter": round(walkthrough_adapter, 1),
            "walkthrough_image": round(walkthrough_image, 1),
            "demo_alone": float(demo_seconds.group(1)) if demo_seconds else None,
            "stop_after_ctrl_c": round(stop_seconds, 1),
            "total": round(total, 1),
        },
        "goal_seconds": GOAL_SECONDS,
        "timeline": [{"step": label, "seconds": round(t, 1)} for label, t in timeline],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
