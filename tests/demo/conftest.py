"""Fixtures of the demo tests: the real app on a free localhost port, and headless Chromium.

Chromium is Debian's (``apt-get install chromium chromium-driver``; ``.ci/run`` installs it).
Without it the browser tests skip on a developer's machine, and fail under CI (CI=true), so a CI
run can never pass them silently.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

CHROMIUM = os.environ.get("DCACHE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DCACHE_CHROMEDRIVER", "/usr/bin/chromedriver")


@pytest.fixture(scope="session")
def demo_url():
    """The demo served on 127.0.0.1 by this process (so tests can also look at its pools)."""
    from dcache.demos.app import launch
    from demo_checks import free_port

    port = free_port()
    app = launch("127.0.0.1", port, concurrency=2, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="session")
def client(demo_url):
    from gradio_client import Client

    return Client(demo_url, verbose=False)


@pytest.fixture(scope="session")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) or shutil.which(p))]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        msg = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)  # CI installs all of them: never pass the browser tests by skipping
        pytest.skip(msg)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="dcache-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required", f"--user-data-dir={profile}", "--window-size=1400,1300"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_direct():
    """Independent runs on a fresh reference pipeline: (policy or None, options, label, seed, steps, guidance)
    → (image (C, H, W) in [0, 1], stats or None)."""
    import dcache
    from dcache.pipelines.zoo.reference import load_reference_pipeline

    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)

    def run(policy, options, label, seed, steps, guidance=4.0):
        if policy is not None:
            dcache.accelerate(pipe, policy, **options)
        try:
            out = pipe(class_labels=[label], num_inference_steps=steps, guidance_scale=guidance,
                       generator=torch.Generator().manual_seed(seed), output_type="pt").images[0]
            stats = pipe.dcache.stats() if policy is not None else None
        finally:
            if policy is not None:
                dcache.disable(pipe)
        return out, stats

    return run


import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
