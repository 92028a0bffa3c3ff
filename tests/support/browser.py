"""A real headless Chromium (Debian's `chromium` + `chromium-driver`, scripts/install_chromium.sh) driven by
Selenium; the tests that need it skip when it is not installed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def have_browser() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


@contextmanager
def chromium(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium (its own profile under tmp_path), quit at the end."""
    if not have_browser():
        pytest.skip("chromium/chromedriver are not installed (scripts/install_chromium.sh)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                "--no-first-run", "--disable-background-networking", "--disable-sync"):
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    # An explicit driver path: Selenium Manager never looks for (or downloads) one.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
