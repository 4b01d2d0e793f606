"""serve.py's page in a real browser: headless chromium (Debian's `chromium` and `chromium-driver`) driven
by selenium. tests/test_serve.py uses these steps; run as a script, they made the README's screenshot:

    python serve.py --ckpt CKPT --port 8000 &
    python tests/serve_page.py http://127.0.0.1:8000 IMAGE "What color is the background?" docs/serve.png \\
        --patch 2,3 --word red
"""

import argparse
import os
import shutil

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


def find_chromium():
    """(browser, driver) paths, or a string saying what is missing."""
    browser = next((shutil.which(b) for b in ("chromium", "chromium-browser") if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    return "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"


def open_browser(width=1200, height=820):
    """Headless chromium at a window size; selenium is pointed at the system's files, so it downloads nothing."""
    browser, driver = find_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver))


def load(d, url, image, timeout=60):
    """Open the page and pick `image` through its file input; wait until the patch grid is drawn."""
    d.get(url)
    d.find_element(By.ID, "file").send_keys(os.path.abspath(image))
    WebDriverWait(d, timeout).until(lambda d: d.find_element(By.ID, "grid").get_attribute("data-ready"))


def ask(d, question, timeout=120):
    """Type a question, send it with Enter, wait for the streamed answer to finish; returns its text."""
    before = len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error"))
    d.find_element(By.ID, "q").send_keys(question, Keys.ENTER)
    done = ".msg[data-done]"
    WebDriverWait(d, timeout).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) > before)
    return d.find_elements(By.CSS_SELECTOR, done)[-1].get_attribute("textContent")  # as streamed, spaces kept


def hover(d, g, row, col):
    """Move the mouse over patch (row, col) of the g x g grid, by its place on the picture; returns the words
    the page shows for it: (top-5 visual tokens, nearest token)."""
    stage = d.find_element(By.ID, "stage")
    side = stage.size["width"]
    ActionChains(d).move_to_element_with_offset(stage, int((col + 0.5) * side / g - side / 2),
                                                int((row + 0.5) * side / g - side / 2)).perform()
    WebDriverWait(d, 10).until(lambda d: d.find_elements(By.ID, "nearest"))
    return [e.text for e in d.find_elements(By.CSS_SELECTOR, "#top .tok")], d.find_element(By.ID, "nearest").text


def light(d, word, timeout=30):
    """Type a word into the word box; returns the line the page writes about where it is most probable."""
    box = d.find_element(By.ID, "word")
    box.clear()
    box.send_keys(word)
    WebDriverWait(d, timeout).until(lambda d: d.find_element(By.ID, "wordinfo").text.startswith(f'"{word}"')
                                    or "No token" in d.find_element(By.ID, "wordinfo").text)
    return d.find_element(By.ID, "wordinfo").text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("out", help="the screenshot (PNG)")
    p.add_argument("--patch", default="0,0", help="row,col of the patch to hover (from 0)")
    p.add_argument("--word", default=None, help="a word to light up")
    p.add_argument("--size", default="1200,900", help="window width,height")
    a = p.parse_args()
    d = open_browser(*map(int, a.size.split(",")))
    try:
        load(d, a.url, a.image)
        print("answer:", ask(d, a.question))
        if a.word:
            print(light(d, a.word))
        g = int(d.execute_script("return tokens.grid"))
        print("patch", a.patch, hover(d, g, *map(int, a.patch.split(","))))
        d.execute_script("window.scrollTo(0, 0)")
        d.save_screenshot(a.out)
    finally:
        d.quit()


if __name__ == "__main__":
    main()
