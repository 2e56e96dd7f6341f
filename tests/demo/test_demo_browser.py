"""End to end in headless Chromium: pick a policy, generate, read what the page shows.

Set DCACHE_DEMO_SCREENSHOT=docs/demo.png to write the README's screenshot from the image test.
"""

from __future__ import annotations

import io
import os
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from demo_checks import as_uint8, expected_timeline, number_after, parse_timeline, require, shown_pixels

require("gradio")
require("selenium")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def css(driver, selector):
    return driver.find_element(By.CSS_SELECTOR, selector)


def wait_for(driver, condition, timeout=180, what=""):
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def open_page(driver, url):
    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#image-generate"), 60, "page did not load")


def choose_radio(driver, fieldset_id, value):
    # Re-found and re-checked each time: a tab shown for the first time may still re-render its
    # widgets, which would silently drop a choice made on the old elements.
    selector = f"#{fieldset_id} input[value='{value}']"
    for _ in range(10):
        driver.execute_script("arguments[0].click()", css(driver, selector))
        time.sleep(0.3)
        if css(driver, selector).is_selected():
            return
    raise AssertionError(f"could not select {value} in #{fieldset_id}")


def set_input(driver, selector, value):
    for _ in range(10):
        el = wait_for(driver, lambda d: (d.find_elements(By.CSS_SELECTOR, selector) or [None])[0], 20, selector)
        el.send_keys(Keys.CONTROL, "a")
        el.send_keys(Keys.DELETE)
        el.send_keys(str(value))
        el.send_keys(Keys.TAB)
        time.sleep(0.2)
        if css(driver, selector).get_attribute("value") == str(value):
            return
    raise AssertionError(f"could not set {selector} to {value!r}")


def text_of(driver, selector):
    return driver.execute_script("return arguments[0].innerText", css(driver, selector)).strip()


def value_of(driver, selector):
    return css(driver, selector).get_attribute("value")


def wait_status(driver, selector, timeout=180):
    wait_for(driver, lambda d: text_of(d, selector) in ("done",) or text_of(d, selector).startswith(("Error", "Internal")),
             timeout, f"{selector} never finished")
    return text_of(driver, selector)


def loaded_image(driver, selector):
    def ready(d):
        imgs = d.find_elements(By.CSS_SELECTOR, f"{selector} img")
        if imgs and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", imgs[0]):
            return imgs[0]
        return None

    img = wait_for(driver, ready, 60, f"{selector} shows no image")
    with urllib.request.urlopen(img.get_attribute("src")) as r:
        return Image.open(io.BytesIO(r.read()))


def test_image_tab_end_to_end(browser, demo_url, digits_direct):
    from dcache.pipelines.zoo.scenes import sample_prompts

    open_page(browser, demo_url)
    # a fresh page starts on the default model, the prompt-conditioned scenes one, with a grammar prompt
    assert css(browser, "#image-model input[value='scenes']").is_selected()
    assert value_of(browser, "#image-condition textarea, #image-condition input") == sample_prompts(1, 0)[0]
    choose_radio(browser, "image-model", "digits")
    set_input(browser, "#image-condition textarea, #image-condition input", 3)
    choose_radio(browser, "image-policy", "static")
    set_input(browser, "#knob-static-interval input", 2)
    set_input(browser, "#image-steps input", 12)
    set_input(browser, "#image-seed input", 4)
    css(browser, "#image-generate").click()
    assert wait_status(browser, "#image-status") == "done"

    base = loaded_image(browser, "#image-baseline")
    acc = loaded_image(browser, "#image-accelerated")
    loaded_image(browser, "#image-diff")
    plot = loaded_image(browser, "#image-timeline-plot")
    metrics = text_of(browser, "#image-metrics")
    timeline = value_of(browser, "#image-timeline-text textarea")

    # the shown speedup is the ratio of the shown wall times
    t_base = number_after(metrics, "wall time: baseline")
    t_acc = number_after(metrics, "· static")
    shown = number_after(metrics, "speedup:")
    assert shown == pytest.approx(t_base / t_acc, rel=0.02, abs=0.011)
    # the images and the timeline are what the policy gives on its own, run here independently
    want_acc, stats = digits_direct("static", {"interval": 2}, 3, 4, 12)
    want_base, _ = digits_direct(None, {}, 3, 4, 12)
    assert np.abs(shown_pixels(acc, 32).astype(int) - as_uint8(want_acc)).max() <= 1
    assert np.abs(shown_pixels(base, 32).astype(int) - as_uint8(want_base)).max() <= 1
    assert number_after(metrics, "FLOPs computed:") == pytest.approx(1 - stats["flops_avoided_fraction"], abs=6e-4)
    got = parse_timeline(timeline)
    assert got == expected_timeline(stats)
    assert any(r > 0 for _, r, _ in got.values()) and any(c > 0 for c, _, _ in got.values())
    assert plot.size[0] > 300

    shot = os.environ.get("DCACHE_DEMO_SCREENSHOT")
    browser.set_window_size(1400, 1450)  # the whole image tab, for the README
    time.sleep(0.5)
    browser.save_screenshot(shot or os.path.join(os.environ.get("TMPDIR", "/tmp"), "dcache-demo.png"))


def test_error_is_shown_in_the_page(browser, demo_url):
    open_page(browser, demo_url)
    choose_radio(browser, "image-model", "digits")
    set_input(browser, "#image-condition textarea, #image-condition input", 3)
    set_input(browser, "#image-model-path textarea, #image-model-path input", "/no/such/pipeline")
    set_input(browser, "#image-steps input", 4)
    css(browser, "#image-generate").click()
    status = wait_status(browser, "#image-status", 60)
    assert status.startswith("Error") and "cannot load a diffusers pipeline from '/no/such/pipeline'" in status
    # the app is alive: the embedded model still generates from the same page
    set_input(browser, "#image-model-path textarea, #image-model-path input", "")
    css(browser, "#image-generate").click()
    wait_for(browser, lambda d: text_of(d, "#image-status") == "done", 120, "no recovery after an error")


def click_tab(driver, name, ready):
    tab = [b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == name][0]
    tab.click()
    wait_for(driver, lambda d: any(e.is_displayed() for e in d.find_elements(By.CSS_SELECTOR, ready)), 30, ready)
    time.sleep(0.5)


def test_dllm_tab_in_browser(browser, demo_url):
    from dcache.eval.targets import dllm_valid_answers
    from dcache.pipelines.dllm import scripts_task as task

    open_page(browser, demo_url)
    click_tab(browser, "dLLM", "#dllm-generate")
    choose_radio(browser, "dllm-length", "32")
    set_input(browser, "#dllm-batch input", 2)
    css(browser, "#dllm-generate").click()
    assert wait_status(browser, "#dllm-status") == "done"
    prompts, mask, _ = task.make_problems(2, gen_length=32, seed=0)
    valid = [task.render(a) for a in dllm_valid_answers(prompts[0], mask[0], 32)]  # 2-3 valid answers
    assert value_of(browser, "#dllm-plain textarea") in valid
    assert value_of(browser, "#dllm-cached textarea") in valid
    metrics = text_of(browser, "#dllm-metrics")
    assert "tokens/s" in metrics and "accuracy 1.000" in metrics


def test_video_tab_plays_mp4_in_browser(browser, demo_url):
    open_page(browser, demo_url)
    click_tab(browser, "AR video", "#video-generate")
    set_input(browser, "#video-frames input", 9)
    css(browser, "#video-generate").click()
    assert wait_status(browser, "#video-status") == "done"
    for sel in ("#video-baseline video", "#video-policy video"):
        video = wait_for(browser, lambda d: (d.find_elements(By.CSS_SELECTOR, sel) or [None])[0], 60, sel)
        # Chromium decoded the file: metadata read, real duration and frame size
        wait_for(browser, lambda d: d.execute_script("return arguments[0].readyState >= 1 && arguments[0].duration > 0",
                                                     video), 60, f"{sel} did not load")
        w, dur = browser.execute_script("return [arguments[0].videoWidth, arguments[0].duration]", video)
        assert w == 192 and dur > 0.5
    assert "KV memory" in text_of(browser, "#video-metrics")
