"""Headless Chromium opens the dashboard of a finished study, served by `budgetpress dashboard` as a
real process, and finds its trials. The screenshot is kept under tests/artifacts/."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboard.conftest import STUDY, load

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed from Debian packages if missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        apt = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
        if os.geteuid() != 0 and shutil.which("sudo"):
            apt = ["sudo", "-n", *apt]
        done = subprocess.run(apt, capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            pytest.skip(f"chromium could not be installed with apt-get: {done.stderr.strip()[-300:]}")
    return str(shutil.which("chromium")), str(shutil.which("chromedriver"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the dashboard exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"the dashboard did not answer at {url} within {timeout:.0f} s")


@pytest.fixture
def dashboard(study_db: str, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    command = [sys.executable, "-m", "budgetpress", "dashboard", "--storage", study_db, "--port", str(port)]
    log = (tmp_path / "dashboard.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/api/meta", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_chromium_finds_the_trials_of_a_finished_study(
    chromium: tuple[str, str], dashboard: str, study_db: str
) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    n_trials = len(load(study_db).trials)
    try:
        driver.get(f"{dashboard}/dashboard/studies/1/trials")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: STUDY in d.find_element(By.TAG_NAME, "body").text)
        wait.until(lambda d: f"Trial {n_trials - 1}" in d.find_element(By.TAG_NAME, "body").text)
        text = driver.find_element(By.TAG_NAME, "body").text
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard-trials.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
    assert "Trial 0" in text and "memory_over_budget" in text
    assert shot.read_bytes().startswith(b"\x89PNG")
