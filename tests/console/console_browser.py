"""Driving Debian's Chromium for the console tests: Selenium with the system chromedriver (nothing is downloaded:
Selenium Manager is told to stay offline), axe-core injected from the committed file, and waits on the page's state.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
AXE_JS = HERE / "axe.min.js"
CHROMIUM = os.environ.get("KRONA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("KRONA_CHROMEDRIVER", "/usr/bin/chromedriver")
# Where screenshots and the benchmark's JSON go (CI keeps this folder as the run's artifacts).
ARTIFACTS = Path(os.environ.get("KRONA_CONSOLE_ARTIFACTS", HERE / "artifacts"))

# The closed network of these machines refuses Chromium's background connections; these flags keep it from
# trying (and from printing errors about it).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-features=Translate,OptimizationHints,MediaRouter",
    "--password-store=basic",
)


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (Path(path).exists() or shutil.which(path)):
            return f"{path} is missing: apt-get install -y chromium chromium-driver (make test does)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is missing: pip install -e '.[dev]'"
    return None


def start_chromium(profile_dir: Path, download_dir: Path, *, width: int = 1280, height: int = 900):
    """A headless Chromium with an empty profile, downloads saved to ``download_dir``, the browser log kept."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a driver or a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile_dir.mkdir(parents=True, exist_ok=True)
    download_dir.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs",
        {
            "download.default_directory": str(download_dir),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
            "safebrowsing.enabled": False,
        },
    )
    service = Service(CHROMEDRIVER, log_output=str(profile_dir.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
    driver.set_script_timeout(60)
    return driver


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.1) -> Any:
    """Poll ``condition()`` until it returns something truthy (returned); AssertionError naming ``what`` after
    ``timeout`` seconds. Exceptions from the page (an element not there yet) count as not yet."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the page is changing under us (an element not there yet): try again
            last_error = exc
        time.sleep(interval)
    detail = f" ({last_error})" if last_error else ""
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")


def axe_violations(driver, impacts: tuple[str, ...] = ("serious", "critical")) -> list[dict]:
    """Run axe-core (the committed build) on the page as it is; the violations of these impacts."""
    if not driver.execute_script("return typeof window.axe !== 'undefined'"):
        # Injected as a script of the page (the console's CSP forbids inline scripts, but WebDriver's execute
        # runs outside the page's CSP).
        driver.execute_script(AXE_JS.read_text(encoding="utf-8"))
    result = driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        axe.run(document, {resultTypes: ["violations"]})
          .then((r) => done(JSON.stringify(r.violations)))
          .catch((e) => done(JSON.stringify(
            [{id: "axe-error", impact: "critical", description: String(e), nodes: []}]
          )));
        """
    )
    return [v for v in json.loads(result) if v.get("impact") in impacts]


def describe_violations(violations: list[dict]) -> str:
    lines = []
    for v in violations:
        targets = [", ".join(n.get("target", [])) for n in v.get("nodes", [])[:5]]
        lines.append(f"{v['id']} ({v.get('impact')}): {v.get('help') or v.get('description')} at {targets}")
    return "\n".join(lines)


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[dict]:
    """The browser log's errors since the last call (SEVERE entries), less those whose message contains one of
    ``allowed`` (the expected failed requests: a refused key on purpose, the role probe of an admin key)."""
    entries = driver.get_log("browser")
    return [e for e in entries if e.get("level") == "SEVERE" and not any(a in e.get("message", "") for a in allowed)]


def artifacts_dir() -> Path:
    """ARTIFACTS, made if missing, with a .gitignore that keeps its files out of git."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ignore = ARTIFACTS / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    return ARTIFACTS


def screenshot(driver, name: str) -> Path:
    """The whole page as ARTIFACTS/<name>.png (the window grown to the page's height for the shot)."""
    path = artifacts_dir() / f"{name}.png"
    size = driver.get_window_size()
    driver.execute_script("window.scrollTo(0, 0)")
    height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    driver.set_window_size(size["width"], min(max(size["height"], height + 120), 4000))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(size["width"], size["height"])
    return path
