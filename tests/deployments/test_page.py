"""The page at `/`, in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): it loads with no console errors, submits a prompt as an async job, shows progress and a
preview over the job's events, and shows the image the API makes for the same seed; under the guarded
application it asks for the API key and shows the API's own error messages."""

from __future__ import annotations

import base64
import io
import os
import shutil

import httpx
import numpy as np
import pytest
from image_checks import max_pixel_diff
from local_cluster import GUARDED_AUTH, GUARDED_KEYS
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait


@pytest.fixture(scope="module")
def browser():
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def console_errors(browser) -> list[str]:
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def fill(browser, field: str, value: str) -> None:
    element = browser.find_element(By.ID, field)
    element.clear()
    element.send_keys(value)


def test_the_page_generates_the_image_the_api_makes_for_the_same_seed(cluster, browser):
    browser.get(f"{cluster.url}/")
    wait = WebDriverWait(browser, 120, poll_frequency=0.05)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
    options = [o.text for o in Select(browser.find_element(By.ID, "model")).options]
    assert options == ["tiny", "tiny-kontext", "tiny-fill"]  # /v1/models, the default first
    assert browser.find_element(By.ID, "key-row").get_attribute("hidden") is not None  # no key asked for
    prompt = "a yellow square at the bottom, purple background"
    fill(browser, "prompt", prompt)
    Select(browser.find_element(By.ID, "size")).select_by_visible_text("64x64")
    fill(browser, "steps", "12")
    fill(browser, "seed", "77")
    browser.find_element(By.ID, "generate").click()
    # Progress and a preview show while it runs.
    wait.until(lambda b: (b.find_element(By.ID, "preview").get_attribute("src") or "").startswith("data:image/jpeg"))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#gallery img.result"))
    assert browser.find_element(By.ID, "status").text == "succeeded"
    assert browser.find_element(By.ID, "progress").get_attribute("value") == "12"
    image = browser.find_element(By.CSS_SELECTOR, "#gallery img.result")
    assert image.get_attribute("data-seed") == "77"
    shown = base64.b64decode(image.get_attribute("src").split(",", 1)[1])
    api = httpx.post(
        f"{cluster.url}/v1/images/generations",
        json={"prompt": prompt, "size": "64x64", "num_inference_steps": 12, "seed": 77, "guidance_scale": 3.5},
        timeout=120,
    ).json()
    assert max_pixel_diff(pixels(shown), pixels(base64.b64decode(api["data"][0]["b64_json"]))) <= 2
    # The card says how to make it again, with the seed.
    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    curl = card.find_element(By.CSS_SELECTOR, ".curl").get_attribute("textContent")
    assert f"{cluster.url}/generate" in curl and '"seed":77' in curl
    assert card.find_element(By.CSS_SELECTOR, ".download").get_attribute("download") == "fluxray-77.png"
    assert console_errors(browser) == []


def test_the_page_asks_for_the_key_and_shows_the_apis_errors(cluster, browser):
    browser.get(f"{cluster.guarded_url}/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    wait.until(lambda b: b.find_element(By.ID, "key-row").get_attribute("hidden") is None)
    assert "needs an API key" in browser.find_element(By.ID, "error").text
    fill(browser, "api-key", GUARDED_KEYS[0])
    browser.find_element(By.ID, "prompt").click()  # the key field's change event loads the models
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#model option"))
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    # The guarded app's budget is one 256x256 image at 8 steps: 28 steps is over it, and the page says
    # what the API says.
    fill(browser, "steps", "28")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda b: b.find_element(By.ID, "error").get_attribute("hidden") is None)
    expected = httpx.post(
        f"{cluster.guarded_url}/v1/images/jobs",
        json={"prompt": "x", "size": "256x256", "num_inference_steps": 28},
        headers=GUARDED_AUTH,
        timeout=30,
    ).json()["error"]["message"]
    assert browser.find_element(By.ID, "error").text == expected and "over this server's budget" in expected
    # Only the refused calls are in the console (Chromium logs a failed fetch's status), nothing else.
    assert all("422" in message or "401" in message for message in console_errors(browser)), console_errors(browser)
