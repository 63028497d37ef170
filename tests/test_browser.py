"""The pages a user opens in a browser, loaded in headless Chromium: a real run's report.html, the
comparison page that links to it, and the live dashboard. Each must load with no console error and
show every image.

Chromium is Debian's (``apt-get install chromium chromium-driver``; ``.ci/run`` installs it) driven
through Selenium; without them these tests are skipped, saying so.
"""

from __future__ import annotations

import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no headless Chromium: apt-get install chromium chromium-driver")

# Chromium's warnings about its own software WebGL are not the page's.
IGNORED = ("Automatic fallback to software WebGL",)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def console_errors(driver) -> list[str]:
    """The console's errors since the last call (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and not any(text in entry["message"] for text in IGNORED)]


def images(driver) -> list[tuple[str, bool, int]]:
    """Every <img> of the page: its alt text, whether it finished loading, and its decoded width."""
    return [tuple(image) for image in driver.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")]


def open_page(driver, url: str) -> None:
    console_errors(driver)  # drop what an earlier page left
    driver.get(url)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two real tiny runs (FedAvg with CE and with BSM) and their reports."""
    import fedward
    from conftest import TINY

    root = tmp_path_factory.mktemp("browser-runs")
    runs = {loss: fedward.train({**TINY, "method": "fedavg", "loss_fn_name": loss, "output": str(root / loss)})
            for loss in ("CE", "BSM")}
    return root, runs


def test_a_real_runs_report_loads_with_every_figure_and_no_console_error(browser, two_runs):
    _, runs = two_runs
    report = runs["BSM"].path / "report.html"
    open_page(browser, report.as_uri())
    assert console_errors(browser) == []
    shown = images(browser)
    assert {alt for alt, _, _ in shown} >= {"Learning curves", "Loss curves", "Confusion matrix",
                                            "Aggregation weights"}
    assert [alt for alt, complete, width in shown if not (complete and width > 0)] == []  # none broken
    text = browser.execute_script("return document.body.innerText")
    assert "BSM" in text and "BCN" in text  # the settings and the hospitals by name


def test_the_comparison_page_loads_and_links_to_each_report(browser, two_runs):
    from fedward.tracking import compare

    root, runs = two_runs
    compare([runs["CE"].path, runs["BSM"].path], out_dir=root)
    open_page(browser, (root / "comparison.html").as_uri())
    assert console_errors(browser) == []
    assert [alt for alt, complete, width in images(browser) if not (complete and width > 0)] == []
    links = [a.get_attribute("href") for a in browser.find_elements("css selector", "a")]
    assert {runs[loss].path.joinpath("report.html").as_uri() for loss in runs} <= set(links)
    browser.find_element("link text", runs["CE"].path.name).click()  # the link opens that run's report
    assert browser.current_url == runs["CE"].path.joinpath("report.html").as_uri()
    assert console_errors(browser) == [] and len(images(browser)) >= 3


@pytest.mark.slow
def test_the_dashboard_shows_a_running_run_and_its_new_rounds(browser, tmp_path):
    from test_dashboard import _free_port, _rows

    from fedward.tracking import RunDirectory
    from fedward.tracking.dashboard import launch

    run = RunDirectory.create(tmp_path / "live")
    run.write_config({"method": "fedavg", "client_names": ["BCN", "MSK"]})
    run.log_rows(_rows(1))
    open_page(browser, launch([tmp_path / "live"], port=_free_port()))

    def page_shows(*texts: str, seconds: float = 60) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            text = browser.execute_script("return document.body.innerText")
            if all(t in text for t in texts):
                return text
            time.sleep(0.5)
        raise AssertionError(f"the dashboard never showed {texts}: {text[:500]}")

    page_shows("live", "aggregation/weight", "participation", "server")
    assert console_errors(browser) == []
    run.log_rows(_rows(2))  # the run goes on: a reload shows round 2
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        browser.refresh()
        steps = browser.execute_script(
            "return fetch('data/plugin/scalars/scalars?run=live/.&tag=server/pooled/test/balanced_accuracy')"
            ".then(r => r.json()).then(points => points.map(p => p[1]))")
        if steps == [1, 2]:
            break
        time.sleep(1)
    assert steps == [1, 2]
    assert console_errors(browser) == []
