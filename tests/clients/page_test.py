"""The page at / in headless Chromium, driven like a person: paste sentences, set the threshold,
press Cluster, read the clusters shown. Saves a screenshot.

    python page_test.py BASE_URL SCREENSHOT_PNG
"""
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

SEED = [
    "Dog Walking: 10 Simple Steps", "The Secrets of Dog Walking", "Why You Need To Dog Walking",
    "The Art of Dog Walking", "The Joy of Dog Walking", "Public Speaking For The Modern Age",
    "Learn The Art of Public Speaking", "Master The Art of Public Speaking",
    "The Best Way To Public Speaking",
]
EXTRA = ["I love pizza.", "Pizza is my favourite food."]


def main(base_url, screenshot):
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1100,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(base_url + "/")
        box = driver.find_element(By.ID, "sentences")
        box.clear()
        box.send_keys("\n".join(SEED + EXTRA))
        threshold = driver.find_element(By.ID, "threshold")
        threshold.clear()
        threshold.send_keys("0.5")
        driver.find_element(By.ID, "run").click()
        WebDriverWait(driver, 30).until(ec.text_to_be_present_in_element((By.ID, "status"), "cluster"))
        clusters = [
            [li.text for li in cluster.find_elements(By.CSS_SELECTOR, "li.sentence")]
            for cluster in driver.find_elements(By.CSS_SELECTOR, "li.cluster")
        ]
        driver.save_screenshot(screenshot)
        expected = [SEED[:5], SEED[5:], EXTRA]
        assert clusters == expected, f"page shows {clusters}"
        print(f"page shows {len(clusters)} clusters as expected; screenshot {screenshot}")
    finally:
        driver.quit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
