"""Headless Debian Chromium driven through its own chromedriver (Selenium), for the page tests:
no download of any browser or driver, no network beyond loopback, and a record of every request
the pages make and every console error they log."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from lab.peers import missing_peer
from tests.support import REPO

T = TypeVar("T")

# A proxy that goes nowhere (the discard port, closed here) for everything but loopback, which
# Chromium never sends through a proxy: a page that fetched anything from outside would fail.
DEAD_PROXY = "http://127.0.0.1:9"
# TEST-NET-1 (RFC 5737): reached only through the proxy, so loading it must fail at once.
OUTSIDE_URL = "http://192.0.2.1/"
WINDOW = (1400, 1000)


def artifacts_dir() -> Path:
    path = Path(os.environ.get("DETECTORD_ARTIFACTS", REPO / "artifacts")) / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One Chromium window and what it has fetched and logged since it was last asked."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def get(self, url: str) -> None:
        self.driver.get(url)

    def wait(self, what: Callable[[], T], timeout: float = 30.0, message: str = "") -> T:
        """The first truthy value of `what()`, polled (a half-drawn page's exceptions count as not yet)."""

        def attempt(_: Any) -> T | None:
            try:
                return what()
            except (StaleElementReferenceException, LookupError, ValueError):
                return None

        try:
            return cast(T, WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(attempt))
        except WebDriverException as exc:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}") from exc

    def css(self, selector: str) -> list[Any]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def one(self, selector: str) -> Any:
        found = self.css(selector)
        if not found:
            raise LookupError(selector)
        return found[0]

    def requests(self) -> list[str]:
        """The URL of every request the pages made since the last call (Network.requestWillBeSent)."""
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def console_errors(self) -> list[str]:
        """The SEVERE entries of the console since the last call."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE"]

    def screenshot(self, name: str) -> Path:
        """The whole page (beyond the window) as artifacts/screenshots/NAME."""
        size = self.driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": max(size["width"], WINDOW[0]), "height": size["height"], "scale": 1},
            },
        )
        path = artifacts_dir() / name
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's headless Chromium through Debian's chromedriver; skipped where they are missing."""
    # Selenium Manager must never look for, or download, a browser or a driver.
    os.environ["SE_OFFLINE"] = "true"
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).exists() and Path(driver_path).exists()):
        missing_peer("chromium and chromium-driver are not installed (scripts/install-system-deps.sh)")

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # containers and root, where the sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--proxy-server={DEAD_PROXY}",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        driver.set_page_load_timeout(30)
        browser = Browser(driver)
        # The proxy is in force: anything beyond loopback fails (fast, with the proxy's error).
        with contextlib.suppress(Exception):
            driver.get(OUTSIDE_URL)
        assert "ERR_PROXY_CONNECTION_FAILED" in driver.page_source, "the dead proxy is not in force"
        browser.requests(), browser.console_errors()  # start the record after that check
        yield browser
    finally:
        driver.quit()
