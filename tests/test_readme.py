"""The README's command blocks, read from README.md when the test runs (never copied here) and run as written
against `krona up`; every `krona …` line of the README parses."""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from services.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"```bash\n(.*?)```", re.S)


def marked_block(name: str) -> str:
    """The bash block right after ``<!-- readme-test: NAME -->``."""
    marker = f"<!-- readme-test: {name} -->"
    assert marker in README, f"README.md lost its marker {marker}"
    match = FENCE.search(README, README.index(marker))
    assert match is not None and match.start() - README.index(marker) < len(marker) + 3, f"no bash block after {marker}"
    return match.group(1)


def command_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = block.replace("\\\n", " ")
    lines = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words))
    return lines


def krona_invocations() -> list[str]:
    """Every `krona …` command in the README's bash blocks, in `$(…)` too, that is not a sketch (… or [options])."""
    found = []
    for block in FENCE.findall(README):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].split(" # ", 1)[0].strip()
            for command in re.findall(r"\$\((krona [^)]*)\)", line) + ([line] if line.startswith("krona ") else []):
                if not any(sketch in command for sketch in ("…", "...", "[", "|", "<")):
                    found.append(command)
    return found


def test_the_readme_says_how_to_put_krona_on_path_and_make_demo_prints_the_next_command():
    assert "source .venv/bin/activate" in command_lines(marked_block("quick start"))
    demo = re.search(r"^demo:.*?(?=^\S|\Z)", (ROOT / "Makefile").read_text(), re.S | re.M).group(0)
    assert "source $(VENV)/bin/activate" in demo and "krona up" in demo


@pytest.mark.parametrize("command", krona_invocations())
def test_every_krona_command_of_the_readme_parses(command):
    words = shlex.split(command.replace("$ADAPTER", "adp_x"))
    try:
        build_parser().parse_args(words[1:])
    except SystemExit as exc:  # --help exits 0
        if exc.code not in (0, None):
            pytest.fail(f"README: `{command}` does not parse (exit {exc.code})")


def test_the_service_walkthrough_runs_as_written(tiny_folders, tmp_path):
    """The README's two blocks in a fresh folder with what `make demo` leaves there (.venv, out/demo/subject/):
    `krona up` in one process, the client block in a bash of its own (set -e: every command must succeed)."""
    from services.cli.demo_service import _free_port, _subject_images

    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    _subject_images(tmp_path / "out" / "demo" / "subject")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KRONA_") or k == "KRONA_MODEL_CACHE"}
    env["PYTHONPATH"] = str(ROOT)
    port = _free_port()

    (up_line,) = command_lines(marked_block("krona up"))
    assert up_line == "krona up"
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        # The README's command; only the port is another (8000 may be taken where the tests run).
        up = subprocess.Popen(
            ["bash", "-c", f"source .venv/bin/activate && exec {up_line} --port {port}"],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        while "Krona is up" not in log_path.read_text():
            assert up.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        script = tmp_path / "walkthrough.sh"
        script.write_text("set -euo pipefail\nsource .venv/bin/activate\n" + marked_block("client"))
        result = subprocess.run(
            ["bash", str(script)],
            cwd=tmp_path,
            env={**env, "KRONA_URL": f"http://127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=1200,
        )
        assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=180)
    assert code == 0 and "Traceback" not in log_path.read_text()
    assert len(list((tmp_path / "images").glob("gen_*.png"))) == 4
    assert (tmp_path / "sks-lokr.safetensors").stat().st_size > 0
    assert (tmp_path / ".krona" / "logs" / "gateway.log").is_file()
