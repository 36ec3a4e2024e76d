"""The monitor's page in headless Chromium: what it shows matches /api/state, and peer names are text.

Three fake peers on real loopback DHTs claim shards and publish metrics; two of them are named with
HTML that would run script if the page ever inserted it as markup. Needs Debian's `chromium` and
`chromium-driver` (installed by `make test`, see tests/system_tools.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

from hivetrain.assign import ShardAssigner
from hivetrain.dht import visible_addresses
from hivetrain.monitor.app import monitoring
from tests.system_tools import skip_unless
from tests.test_monitor import FAST, POLL, get_state, join_run, names, new_peer, publisher
from tests.util import wait_until

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
]

IMG = '<img src=x onerror="alert(1)">'
SCRIPT = "<script>document.title='owned'</script>"
SHARDS = names(24)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    skip_unless("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def url():
    """A run of three peers (two with hostile names) and its monitor; yields the page's URL."""
    run = f"browser{os.getpid()}"
    with contextlib.ExitStack() as stack:
        first = new_peer()
        stack.callback(first.shutdown)
        dhts = [first]
        for _ in range(2):
            dhts.append(new_peer(visible_addresses(first)))
            stack.callback(dhts[-1].shutdown)
        for dht in dhts:
            join_run(dht, run)
        assigners = [ShardAssigner(SHARDS, dht=dht, run_id=run, timing=FAST).start() for dht in dhts[:2]]
        for assigner in assigners:
            stack.callback(assigner.close)
        for _ in range(3):
            claim = assigners[0].next_claim(timeout=10)
            assigners[0].complete(claim, samples=16)
        assigners[0].next_claim(timeout=10)
        assigners[1].next_claim(timeout=10)
        values = [
            dict(samples_per_s=812.4, loss=1.875, lr=0.4, global_step=31, data_epoch=0, shards_read=3,
                 shards_claimed=1, data_wait_frac=0.04, fetch_mb_s=96.5, val_top1=0.6125, val_top5=0.9375,
                 compute_frac=0.93, sync_wait_frac=0.02, sent_per_s=52_400.0, received_per_s=61_250.0,
                 sent_per_sample=3_150.0),
            dict(samples_per_s=405.15, loss=2.0625, lr=0.4, global_step=30, data_epoch=0, shards_read=0,
                 shards_claimed=1, data_wait_frac=0.31, fetch_mb_s=12.25),
            dict(samples_per_s=99.0, loss=2.5, lr=0.4, global_step=29, data_epoch=0),
        ]  # fmt: skip
        peers = [
            stack.enter_context(publisher(dht, run, name, SHARDS))
            for dht, name in zip(dhts, ("alpha", IMG, SCRIPT))
        ]
        running = stack.enter_context(
            monitoring(run_id=run, initial_peers=visible_addresses(first), port=0, options=POLL)
        )
        # a few points of moving curves, then the final values
        for step in range(4):
            for peer, final in zip(peers, values):
                peer.update(**{k: v * (1 + 0.1 * (3 - step)) if k == "loss" else v for k, v in final.items()})
            polls = running.monitor.polls
            wait_until(lambda polls=polls: running.monitor.polls >= polls + 2, what="the monitor to poll")
        wait_until(
            lambda: (
                (s := get_state(running.server.url))["totals"]["samples_per_s"] == pytest.approx(1316.55)
                and s["epoch"]["done"] == 3
            ),
            what="every peer's final values",
        )
        yield running.server.url


def number(text: str) -> float:
    return float(text.replace("%", "").replace("–", "nan"))


TILES = ["total-peers", "total-samples_per_s", "total-global_step", "total-data_epoch", "total-loss",
         "total-val_top1", "total-val_top5", "total-refused", "epoch-done"]  # fmt: skip
PAGE_VIEW = """
const text = (id) => document.getElementById(id).textContent;
return {
  tiles: Object.fromEntries(arguments[0].map((id) => [id, text(id)])),
  rows: [...document.querySelectorAll("#peers tbody tr")].map((tr) => ({
    id: tr.dataset.id,
    cells: Object.fromEntries([...tr.children].map((td) => [td.dataset.field, td.textContent])),
  })),
  shards: [...document.querySelectorAll("#shards .cell")].map((c) => [c.dataset.state, c.dataset.holder, c.title]),
};
"""


def page_view(driver) -> dict:
    """What the page shows, read in one go (the page redraws its table at every poll)."""
    return driver.execute_script(PAGE_VIEW, TILES)


def shown_matches_api(driver, url) -> str | None:
    """None when every number on the page equals /api/state's (to the page's precision), else the first
    difference (the page may be between two polls: callers retry)."""
    state, view = get_state(url), page_view(driver)
    totals = state["totals"]
    tiles = {
        "total-peers": (totals["peers"], 0),
        "total-samples_per_s": (totals["samples_per_s"], 0.05),
        "total-global_step": (totals["global_step"], 0),
        "total-data_epoch": (totals["data_epoch"], 0),
        "total-loss": (totals["loss"], 5e-4),
        "total-val_top1": (100 * totals["val_top1"], 0.05),
        "total-val_top5": (100 * totals["val_top5"], 0.05),
        "total-refused": (sum(state["refused"].values()), 0),
        "epoch-done": (state["epoch"]["done"], 0),
    }
    for element_id, (expected, tolerance) in tiles.items():
        shown = number(view["tiles"][element_id])
        if abs(shown - expected) > tolerance + 1e-9:  # the page rounds half up
            return f"{element_id}: page {shown}, api {expected}"
    if len(view["rows"]) != len(state["peers"]):
        return f"{len(view['rows'])} rows for {len(state['peers'])} peers"
    precision = dict(
        samples_per_s=0.05, loss=5e-4, fetch_mb_s=0.05, val_top1=0.05, val_top5=0.05, data_wait_frac=0.5,
        compute_frac=0.5, sync_wait_frac=0.5, sent_per_s=50, received_per_s=50, sent_per_sample=50,
    )  # fmt: skip
    for row, peer in zip(view["rows"], state["peers"]):
        cells = row["cells"]
        if row["id"] != peer["id"] or cells["name"] != peer["name"] or cells["state"] != peer["state"]:
            return f"row {cells['name']!r} for peer {peer['name']!r}"
        for field in ("global_step", "data_epoch", "shards_read", "shards_claimed"):
            if number(cells[field]) != peer[field]:
                return f"{peer['name']} {field}: page {cells[field]}, api {peer[field]}"
        for field, tolerance in precision.items():
            expected = peer[field] if peer[field] is not None else float("nan")
            if field in ("val_top1", "val_top5", "data_wait_frac", "compute_frac", "sync_wait_frac"):
                expected *= 100
            scale = 1000 if field.startswith(("sent_", "received_")) else 1
            shown = number(cells[field]) * scale
            if not (abs(shown - expected) <= tolerance + 1e-9 or (shown != shown and expected != expected)):
                return f"{peer['name']} {field}: page {cells[field]}, api {peer[field]}"
        if float(cells["lr"]) != pytest.approx(peer["lr"], rel=1e-3):
            return f"{peer['name']} lr: page {cells['lr']}, api {peer['lr']}"
    epoch = state["epoch"]
    if [(state, holder or None) for state, holder, _ in view["shards"]] != list(
        zip(epoch["states"], epoch["holders"])
    ):
        return "shard grid differs"
    return None


def test_page_shows_the_run_as_api_state_has_it(driver, url, tmp_path):
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_until(
        lambda: len(driver.find_elements(By.CSS_SELECTOR, "#peers tbody tr.live")) == 3,
        timeout=20,
        what="the three peers on the page",
    )
    difference = None

    def consistent():
        nonlocal difference
        difference = shown_matches_api(driver, url)
        return difference is None

    try:
        wait_until(consistent, timeout=20, interval=0.3)
    except AssertionError:
        pytest.fail(f"the page disagrees with /api/state: {difference}")
    view = page_view(driver)
    assert (view["tiles"]["epoch-done"], view["tiles"]["total-samples_per_s"]) == ("3", "1316.5")
    # the curves are drawn: one path per series, with points
    for chart, lines in (("chart-throughput", 1), ("chart-loss", 1), ("chart-accuracy", 2)):
        paths = driver.find_elements(By.CSS_SELECTOR, f"#{chart} path.line")
        assert len(paths) == lines and all(p.get_attribute("d").count("L") >= 2 for p in paths), chart
    # hovering a shard says who holds it
    from selenium.webdriver.common.action_chains import ActionChains

    claimed = driver.find_element(By.CSS_SELECTOR, "#shards .cell.claimed")
    ActionChains(driver).move_to_element(claimed).perform()
    info = driver.find_element(By.ID, "shard-info").text
    assert ": in progress · " in info and claimed.get_attribute("data-holder") in info
    assert info == claimed.get_attribute("title")
    shot = tmp_path / "monitor.png"
    assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("HIVETRAIN_SCREENSHOT"):  # refresh the README's picture on request
        shutil.copy(shot, Path(os.environ["HIVETRAIN_SCREENSHOT"]))


def test_peer_names_with_html_are_shown_as_text(driver, url):
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    driver.get(url)
    view = wait_until(
        lambda: len((v := page_view(driver))["rows"]) == 3 and v, timeout=20, what="the peers on the page"
    )
    assert sorted(row["cells"]["name"] for row in view["rows"]) == sorted(["alpha", IMG, SCRIPT])
    # the shard held by the peer named with an <img> tag names it in its tooltip, as text
    assert any(IMG in title for state, _, title in view["shards"] if state == "claimed")
    # nothing of it became markup: no image, no script but the page's own, no alert, title untouched
    assert driver.find_elements(By.TAG_NAME, "img") == []
    scripts = driver.find_elements(By.TAG_NAME, "script")
    assert [s.get_attribute("src") for s in scripts] == [url + "static/app.js"]
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 (raises when no alert is open)
    assert driver.title == "hivetrain monitor"
    assert driver.execute_script("return document.querySelectorAll('[onerror]').length") == 0
    # and the page itself ran without errors (a Content-Security-Policy violation would show here)
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
