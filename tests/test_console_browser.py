"""The web console in a real browser (issue 25): Debian's headless Chromium, driven by Selenium through Debian's
chromedriver (nothing downloaded), against `krona up` on tiny-sd.

A tenant signs in, uploads 3 photos (2 chosen, 1 dropped), trains while the progress moves, generates 2 images and
sees them, downloads the adapter (native and LoKr), compares adapters in a grid, creates and revokes a key with the
keyboard alone; an admin changes a tenant's weight and reads every operator page. Every page: a screenshot in
tests/console/artifacts (KRONA_CONSOLE_ARTIFACTS), no serious or critical axe-core violation, no error in the
browser's console. The time from opening the console to the first generated image is written to
artifacts/benchmark.json (BENCHMARKS.md). Waits are on the page's state, never fixed sleeps.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers.api import png

sys.path.insert(0, str(Path(__file__).resolve().parent / "console"))  # the browser helpers: tests/console
from console_browser import (
    artifacts_dir,
    axe_violations,
    browser_missing,
    console_errors,
    describe_violations,
    screenshot,
    start_chromium,
    wait_until,
)

# The failed requests the journeys make on purpose, which Chromium logs as errors: a wrong key at sign-in (401),
# and the role probe of an admin key (a tenant route answers it 403 tenant_key_required).
REFUSED_KEY = "v1/api-keys?limit=1 - Failed to load resource: the server responded with a status of 401"
ADMIN_PROBE = "v1/api-keys?limit=1 - Failed to load resource: the server responded with a status of 403"

# Tiny jobs: tiny-sd at its native 64 px, a few steps (tests/test_eval_api.py).
TRAIN_STEPS = 3
GENERATE = {"steps": "2", "width": "64", "height": "64", "seed": "7"}


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory, tiny_folders):
    """`krona up` on tiny-sd (SQLite, local blobs, one job worker) with an admin key: (base URL, tenant key,
    admin key, data dir)."""
    from helpers.services import KronaUp

    from shared.db import make_engine, make_session_factory
    from shared.tenants import create_api_key

    missing = browser_missing()
    if missing:
        pytest.fail(missing)
    folder = tmp_path_factory.mktemp("console")
    up = KronaUp(folder, KRONA_EVENT_POLL_INTERVAL_SECONDS="0.2")
    try:
        up.wait(up.ready, "krona up ready", 180)
        engine = make_engine(f"sqlite:///{(up.data_dir / 'krona.db').resolve()}")
        with make_session_factory(engine)() as session:
            admin_key = create_api_key(session, None, name="console-test", role="admin")
            session.commit()
        engine.dispose()
        yield up.base, up.api_key(), admin_key, up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chromium")
    driver = start_chromium(folder / "profile", folder / "downloads")
    driver.download_dir = folder / "downloads"
    yield driver
    driver.quit()


class Page:
    """What every page of the journey is checked for; helpers to find and wait."""

    def __init__(self, driver, base: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.base, self.by = driver, base, By

    def open(self, route: str) -> None:
        self.driver.get(f"{self.base}/console/#/{route}")

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def find_all(self, css: str):
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def wait_for(self, css: str, what: str | None = None, timeout: float = 30):
        return wait_until(lambda: self.find(css), what or css, timeout)

    def text(self, css: str) -> str:
        return self.find(css).text

    def check(self, name: str, *, allowed: tuple[str, ...] = (), settle: bool = True) -> None:
        """Screenshot, axe-core (no serious or critical violation), no error in the browser's console."""
        if settle:  # no action under way (a button stays busy while its confirm dialog is open)
            wait_until(lambda: not self.find_all("[aria-busy=true]"), f"{name} settled")
        screenshot(self.driver, name)
        violations = axe_violations(self.driver)
        assert not violations, f"{name}: axe-core\n{describe_violations(violations)}"
        errors = console_errors(self.driver, allowed)
        assert not errors, f"{name}: browser console errors {errors}"

    def key_in(self, css: str, text: str, clear: bool = True) -> None:
        element = self.find(css)
        if clear:
            element.clear()
        element.send_keys(text)

    def images_shown(self, css: str) -> list:
        """The <img> elements under ``css`` whose picture has loaded (decoded, with a size)."""
        return [
            img
            for img in self.find_all(css)
            if self.driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
        ]


def _safetensors_header(path: Path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def _downloaded(folder: Path, suffix: str) -> Path:
    def done():
        found = [p for p in folder.glob(f"*{suffix}") if p.stat().st_size > 0]
        partial = list(folder.glob("*.crdownload"))
        return found[0] if found and not partial else None

    return wait_until(done, f"a downloaded {suffix}", 30)


def _drop_file(driver, target, name: str, data: bytes) -> None:
    """A file dropped on ``target`` as a person's drag and drop delivers it (a DataTransfer with a File)."""
    driver.execute_script(
        """
        const [target, name, b64] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, {type: "image/png"}));
        for (const type of ["dragenter", "dragover", "drop"]) {
          target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
        }
        """,
        target,
        name,
        base64.b64encode(data).decode(),
    )


def test_a_tenant_trains_generates_downloads_compares_and_manages_keys(console_stack, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    base, key, _, up = console_stack
    page = Page(browser, base)
    photos = []
    for i in range(2):
        photos.append(tmp_path / f"subject-{i}.png")
        photos[-1].write_bytes(png(i, (96, 96)))

    # The benchmark: open the console, sign in, generate 2 images with the base model, until the first one shows
    # (the stack's first generation: its worker loads the pipeline).
    opened = time.monotonic()
    browser.get(f"{base}/console")
    page.wait_for("#api-key", "the sign-in form")
    assert browser.current_url.endswith("/console/"), browser.current_url
    page.key_in("#api-key", key + Keys.ENTER)
    page.wait_for("#instance-prompt", "the train page")
    assert key not in browser.current_url
    assert browser.execute_script("return sessionStorage.getItem('krona.console.key')") == key
    assert browser.execute_script("return localStorage.length") == 0
    page.find("#nav a[href='#/generate']").click()
    page.wait_for("#prompt", "the generate page")
    cold_submitted, cold_first = generate(page, "a photo of a dog on the moon")

    # Train: 3 photos (2 chosen, 1 dropped), the quick preset, then tiny steps in the advanced parameters.
    page.find("#nav a[href='#/trainings']").click()
    page.wait_for("#instance-prompt", "the train page")
    page.find("#photos").send_keys("\n".join(str(p) for p in photos))
    _drop_file(browser, page.find("#dropzone"), "subject-2.png", png(2, (96, 96)))
    wait_until(lambda: len(page.find_all(".thumbs img")) == 3, "3 photo thumbnails")
    assert page.text("#photo-count").startswith("3 photos chosen")
    page.key_in("#instance-prompt", "a photo of sks dog")
    page.key_in("#training-name", "rex")
    page.find("#preset-quick").click()
    page.find("details.advanced summary").click()
    assert page.find("#param-steps").get_attribute("value"), "the quick preset sets the steps"
    page.key_in("#param-steps", str(TRAIN_STEPS))
    page.key_in("#param-gradient_accumulation", "1")
    page.check("02-train")
    page.find("form button[type=submit]").click()
    page.wait_for("#training-progress", "the training's page")

    # The progress moves while it trains: every distinct state the page shows is recorded until it succeeds.
    seen: list[tuple[str, str]] = []

    def ended() -> bool:
        state = (page.text("#training-status"), page.find("#training-progress").get_attribute("value"))
        if not seen or seen[-1] != state:
            seen.append(state)
        return state[0] in ("succeeded", "failed", "canceled")

    wait_until(ended, "the training to end", 240, interval=0.05)
    assert seen[-1] == ("succeeded", str(TRAIN_STEPS)), (seen, up.log()[-3000:])
    assert len(seen) >= 2 and seen[0][0] in ("queued", "running"), seen
    timeline = [li.text for li in page.find_all("#training-timeline li")]
    assert any("training (step" in line for line in timeline) and timeline[-1].endswith("succeeded"), timeline
    assert len(page.find_all(".chart-holder svg circle")) >= 1, "the loss curve has points"
    page.check("03-training")

    # Generate 2 images with the new adapter; they appear when the generation finishes.
    page.find("#open-adapter + a").click()  # "Generate with it"
    page.wait_for("#prompt", "the generate page")
    adapter_id = page.find("#adapter").get_attribute("value")
    assert adapter_id.startswith("adp_")
    warm_submitted, warm_first = generate(page, "a photo of sks dog on the moon")
    page.check("04-generate")

    # Adapters: the list, downloads in both formats, the adapter's page with its samples.
    page.open("adapters")
    page.wait_for("button[data-download=krona]", "the adapters list")
    page.check("05-adapters")
    page.find("button[data-download=krona]").click()
    native = _downloaded(browser.download_dir, ".krona.safetensors")
    assert _safetensors_header(native)["__metadata__"]["format"] == "krona/1"
    page.find("button[data-download=lycoris]").click()
    lokr = _downloaded(browser.download_dir, ".lycoris.safetensors")
    assert any(name.endswith(".lokr_w1") for name in _safetensors_header(lokr))

    # A grid: the adapter at two scales and the base model, one batch, filled in as each image finishes.
    page.find("table input[type=checkbox]").click()
    grid_form = page.find("form[aria-labelledby^=grid]")
    grid_form.find_element(page.by.CSS_SELECTOR, "input[type=text]").send_keys("a photo of sks dog")
    scales, steps, size = grid_form.find_elements(page.by.CSS_SELECTOR, "input[type=text], input[type=number]")[2:5]
    scales.clear()
    scales.send_keys("0.5, 1")
    steps.send_keys("2")
    size.send_keys("64")
    grid_form.find_element(page.by.CSS_SELECTOR, "button[type=submit]").click()
    page.wait_for(".grid-table", "the grid")
    wait_until(lambda: len(page.images_shown(".grid-table img")) == 3, "3 images in the grid", 180)
    assert "succeeded 3" in page.text(".counts")
    page.check("06-batch-grid")

    page.open(f"adapters/{adapter_id}")
    wait_until(lambda: page.images_shown("#samples ~ .tiles img"), "sample images", 30)
    page.check("07-adapter")

    # Keys, with the keyboard alone: create one (shown once), check it works, revoke it through the dialog.
    page.open("keys")
    page.wait_for("#key-name", "the keys page")
    wait_until(lambda: page.find_all("tr[data-key]"), "the key list")
    focus_by_tab(browser, "#key-name")
    browser.switch_to.active_element.send_keys("browser-test" + Keys.ENTER)
    new_key = wait_until(lambda: page.find("#new-key-value").get_attribute("value"), "the new key")
    assert new_key.startswith("krona_") and browser.switch_to.active_element == page.find("#new-key-value")
    assert httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    row = wait_until(lambda: [r for r in page.find_all("tr[data-key]") if "browser-test" in r.text], "its row")[0]
    focus_by_tab(browser, f"tr[data-key='{row.get_attribute('data-key')}'] button")
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_until(lambda: page.find("#confirm").is_displayed(), "the confirm dialog")
    assert browser.switch_to.active_element == page.find("#confirm-ok")
    page.check("08-keys-revoke-dialog", settle=False)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    wait_until(lambda: [r for r in page.find_all("tr[data-key]") if "browser-test" in r.text and "revoked" in r.text],
               "the key revoked")  # fmt: skip
    assert httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {new_key}"}).status_code == 401
    page.check("09-keys")

    # Usage: the day's training and generations in the chart.
    page.open("usage")
    page.wait_for("svg.chart rect", "the usage bars")
    assert "training" in page.text("table") and "generation" in page.text("table")
    page.check("10-usage")
    page.open("batches")
    page.wait_for("table .counts", "the batches list")
    page.check("11-batches")

    # Time from opening the console to the first generated image (sign-in and the form included, the worker's
    # first load of the pipeline too), from submitting to the first image, and the same with the adapter later.
    result = {
        "open_to_first_image_seconds": round(cold_first - opened, 2),
        "submit_to_first_image_seconds": round(cold_first - cold_submitted, 2),
        "with_adapter_submit_to_first_image_seconds": round(warm_first - warm_submitted, 2),
        "generation": {**GENERATE, "num_images": 2},
        "base_model": "tiny-sd",
    }
    (artifacts_dir() / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print("console benchmark:", result)


def generate(page: Page, prompt: str) -> tuple[float, float]:
    """Fill the generate form (2 tiny images) and submit it; wait until both images show. (submitted, first image
    shown) as time.monotonic() values."""
    wait_until(lambda: not page.find_all("[aria-busy=true]"), "the page settled")
    page.key_in("#prompt", prompt)
    for field, value in GENERATE.items():
        page.key_in(f"#{field}", value)
    page.key_in("#num-images", "2")
    before = {a.get_attribute("data-generation") for a in page.find_all("#results article")}
    submitted = time.monotonic()
    page.find("form button[type=submit]").click()
    new = wait_until(
        lambda: [a for a in page.find_all("#results article") if a.get_attribute("data-generation") not in before],
        "the new generation's card",
    )[0]
    card = f"#results article[data-generation='{new.get_attribute('data-generation')}'] img.generated"
    wait_until(lambda: page.images_shown(card), "the first generated image", 180, interval=0.05)
    first_image = time.monotonic()
    wait_until(lambda: len(page.images_shown(card)) == 2, "both generated images", 60)
    sizes = [page.driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
             for image in page.images_shown(card)]  # fmt: skip
    assert sizes == [[64, 64], [64, 64]], sizes
    assert new.find_element(page.by.CSS_SELECTOR, "h3").text == prompt
    return submitted, first_image


def focus_by_tab(driver, css: str, limit: int = 80) -> None:
    """Press Tab from the top of the page until ``css`` has the focus (fails if it never gets it): what a keyboard
    user does."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    target = driver.find_element("css selector", css)
    start_at_the_top(driver)
    for _ in range(limit):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        if driver.switch_to.active_element == target:
            return
    raise AssertionError(f"{css} is not reachable with Tab")


def test_an_admin_changes_a_tenants_weight_and_reads_the_operator_pages(console_stack, browser):
    from selenium.webdriver.common.keys import Keys

    base, tenant_key, admin_key, _ = console_stack
    page = Page(browser, base)
    # A longer training under way, so that the queue and the worker's lease have something to show.
    busy = httpx.post(
        f"{base}/v1/trainings",
        headers={"Authorization": f"Bearer {tenant_key}"},
        data={"instance_prompt": "a photo of zwx cat", "name": "busy", "params": json.dumps({"steps": 200})},
        files=[("images", (f"{i}.png", png(10 + i, (96, 96)), "image/png")) for i in range(2)],
    )
    assert busy.status_code == 202, busy.text
    # Sign out of the previous test's session on a page of the same origin that is not the console, so that the
    # console does not start (and call the API) with a key that test revoked.
    browser.get(f"{base}/healthz")
    browser.execute_script("sessionStorage.clear()")
    console_errors(browser)  # drained; /favicon.ico, which a browser asks of every page, is served (no 404)
    browser.get(f"{base}/console/#/signin")
    page.wait_for("#api-key", "the sign-in form")
    page.check("01-sign-in")
    # A wrong key: the error envelope's message, read out (role=alert).
    page.key_in("#api-key", "krona_not-a-key" + Keys.ENTER)
    alert = wait_until(lambda: page.text("form [role=alert]"), "the sign-in error")
    assert alert == "invalid or revoked API key", alert
    console_errors(browser, (REFUSED_KEY,))  # the 401 just provoked
    page.key_in("#api-key", admin_key + Keys.ENTER)
    page.wait_for("[data-queue=train]", "the queues page")
    console_errors(browser, (ADMIN_PROBE,))  # the role probe's 403
    nav = [a.text for a in page.find_all("#nav a")]
    assert nav == ["Tenants", "Queues", "Workers", "Usage", "Failures"], nav
    # The page refreshes itself: the training shows as running on the train queue once a worker took it.
    wait_until(lambda: page.text("[data-queue=train] dd.running") == "1", "the training running", 120)
    assert "Queue train per tenant" in page.text("[data-queue=train]")
    page.check("12-operator-queues")
    page.open("operator/workers")
    lease = page.wait_for("main table tbody tr", "a worker holding a lease", 30)
    assert "1 training" in lease.text and "live" in lease.text, lease.text
    page.check("13-operator-workers")
    canceled = httpx.post(
        f"{base}/v1/trainings/{busy.json()['id']}/cancel", headers={"Authorization": f"Bearer {tenant_key}"}
    )
    assert canceled.status_code == 202, canceled.text

    page.open("operator/tenants")
    row = page.wait_for("tr[data-tenant]", "the tenants")
    tenant_id = row.get_attribute("data-tenant")
    row.find_element(page.by.CSS_SELECTOR, "button").click()
    page.wait_for("#tenant-weight", "the tenant editor")
    page.key_in("#tenant-weight", "2.5")
    page.key_in("#limit-max_queued_jobs", "500")
    page.find("#tenant-editor button[type=submit]").click()
    wait_until(lambda: "weight 2.5" in page.text("#tenant-editor .notice.success"), "saved")
    assert page.find(f"tr[data-tenant='{tenant_id}'] .weight").text == "2.5"
    answer = httpx.get(f"{base}/v1/tenants/{tenant_id}", headers={"Authorization": f"Bearer {admin_key}"}).json()
    assert answer["weight"] == 2.5 and answer["limits"] == {"max_queued_jobs": 500}
    page.check("14-operator-tenants")

    for route, ready, name in (
        ("operator/usage", "svg.chart rect", "15-operator-usage"),
        ("operator/failures", "main form[aria-label='Filter failures']", "16-operator-failures"),
    ):
        page.open(route)
        page.wait_for(ready, route)
        page.check(name)


def test_every_control_is_reachable_by_keyboard_with_a_visible_focus_and_pages_fit_at_200_percent(
    console_stack, browser
):
    """Tab reaches every visible control of the busiest pages and each shows a focus ring; at 200% zoom (a viewport
    half as wide in CSS pixels) no page scrolls sideways."""
    base, key, _, _ = console_stack
    page = Page(browser, base)
    browser.get(f"{base}/healthz")  # same origin, not the console: it starts with this key, not the previous one
    browser.execute_script("sessionStorage.clear(); sessionStorage.setItem('krona.console.key', arguments[0]);"
                           "sessionStorage.setItem('krona.console.role', 'tenant')", key)  # fmt: skip
    console_errors(browser)  # drained; /favicon.ico, which a browser asks of every page, is served (no 404)
    for route, ready in (("trainings", "#instance-prompt"), ("generate", "#prompt"), ("keys", "tr[data-key]")):
        page.open(route)
        page.wait_for(ready, route)
        wait_until(lambda: not page.find_all("[aria-busy=true]"), "settled")
        browser.execute_script("document.querySelectorAll('details').forEach((d) => { d.open = true; })")
        reached = tab_through(browser)
        focusable = browser.execute_script(
            """
            const selector = "a[href], button:not([disabled]), input:not([disabled]):not([type=hidden]), select, " +
              "textarea, summary, [tabindex='0']";
            return [...document.querySelectorAll(selector)].filter((el) => el.checkVisibility() &&
              !el.closest("dialog:not([open])") && !(el.type === "radio" && !el.checked));
            """
        )
        missing = [e.get_attribute("outerHTML")[:120] for e in focusable if e not in reached["elements"]]
        assert not missing, f"{route}: not reachable with Tab: {missing}"
        assert not reached["unringed"], f"{route}: no visible focus on {reached['unringed']}"

    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 640, "height": 640, "deviceScaleFactor": 2, "mobile": False}
    )
    try:
        for route, ready in (
            ("trainings", "#instance-prompt"),
            ("generate", "#prompt"),
            ("adapters", "main h1 ~ *"),
            ("keys", "tr[data-key]"),
            ("usage", "svg.chart"),
        ):
            page.open(route)
            page.wait_for(ready, route)
            overflow = browser.execute_script(
                "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 1, f"{route} scrolls sideways at 200% zoom by {overflow} px"
        page.open("trainings")
        page.wait_for("#instance-prompt")
        screenshot(browser, "17-train-at-200-percent")
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert not console_errors(browser)


def start_at_the_top(driver):
    """Focus the page's first stop, the skip link, as the first Tab of a fresh page would (the console moves the
    focus to each page's heading, and Chrome then goes on tabbing from there)."""
    driver.execute_script("window.scrollTo(0, 0); document.querySelector('.skip-link').focus()")
    return driver.switch_to.active_element


def tab_through(driver, limit: int = 200) -> dict:
    """Tab from the top of the page until the focus comes back to where it started: the elements reached, and
    those of them that showed no focus ring (no outline and no box-shadow) while focused."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    elements, unringed = [start_at_the_top(driver)], []
    for _ in range(limit):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        element = driver.switch_to.active_element
        if element in elements or element.tag_name == "body":
            break
        elements.append(element)
        ring = driver.execute_script(
            """
            const style = getComputedStyle(arguments[0]);
            return (style.outlineStyle !== "none" && parseFloat(style.outlineWidth) > 0) || style.boxShadow !== "none";
            """,
            element,
        )
        if not ring:
            unringed.append(element.get_attribute("outerHTML")[:120])
    return {"elements": elements, "unringed": unringed}
