"""A screenshot of the page at `/` after it made a few images, taken in headless Chromium as the tests
drive it (the README shows it).

    make serve &                                      # or any running fluxray
    python scripts/page_screenshot.py --url http://127.0.0.1:8000 --out docs/page.png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

PROMPTS = [
    ("a red circle on the left, blue background", 3),
    ("a yellow triangle at the top, purple background", 5),
    ("a white square in the center, green background", 8),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", default="docs/page.png")
    args = parser.parse_args()
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        print("page_screenshot.py: needs chromium and chromedriver on PATH (make install-browser)", file=sys.stderr)
        return 1
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1150"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(f"{args.url}/")
        wait = WebDriverWait(driver, 300, poll_frequency=0.1)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
        Select(driver.find_element(By.ID, "size")).select_by_visible_text("256x256")
        for made, (prompt, seed) in enumerate(PROMPTS, start=1):
            for field, value in (("prompt", prompt), ("seed", str(seed)), ("steps", "4")):
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d, n=made: len(d.find_elements(By.CSS_SELECTOR, "#gallery img.result")) == n)
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
