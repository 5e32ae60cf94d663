"""examples/demo_app.py: its functions without a browser, its command line, and one session in headless Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

pytest.importorskip("gradio")
from classifier_injection import ICISConfig, InjectionConfig, load_injected, save_injected
from tests.conftest import FakeEmbedder, load_example

demo_app = load_example("app")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FAST = demo_app.InjectionSettings(
    FakeEmbedder(), InjectionConfig(icis=ICISConfig(latent_dim=32, max_epochs=5, batch_size=8), calibration="norm")
)
NAMES = [f"class {i}" for i in range(6)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny model saved by save_injected, as a user would pick it in the demo_app."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=len(NAMES)).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": NAMES}
    return save_injected(model, tmp_path_factory.mktemp("app") / "tiny")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(demo_app.sample_photos(demo_app.SAMPLES)[0])


def test_parse_names():
    assert demo_app.parse_names(" capybara, red panda,,capybara , okapi ,") == ["capybara", "red panda", "okapi"]
    assert demo_app.parse_names(" , ") == []


def test_parse_descriptions():
    text = "okapi: a forest giraffe: striped legs\n\n red panda :  a small arboreal mammal \n"
    assert demo_app.parse_descriptions(text, ["okapi", "red panda"]) == {
        "okapi": "a forest giraffe: striped legs",
        "red panda": "a small arboreal mammal",
    }
    with pytest.raises(ValueError, match="line 1 must read 'name: description'"):
        demo_app.parse_descriptions("okapi a forest giraffe", ["okapi"])
    with pytest.raises(ValueError, match="line 2 describes 'zebra', which is not a class to add"):
        demo_app.parse_descriptions("okapi: giraffe\nzebra: striped horse", ["okapi"])


def test_load_model(folder):
    assert demo_app.load_model(f" {folder} ").num_classes == len(NAMES)
    assert demo_app.load_model(demo_app.DEFAULT_MODEL) is demo_app.load_model("")  # the offline lite0, loaded once
    assert demo_app.load_model(demo_app.DEFAULT_MODEL).num_classes == 1000
    with pytest.raises(ValueError, match="neither"):
        demo_app.load_model(str(folder / "missing"))


def test_injection_session(folder, photo):
    session = demo_app.run_injection(
        demo_app.Session(), str(folder), "okapi, red panda", "okapi: a forest giraffe", FAST
    )
    assert session.injected.num_classes == len(NAMES) + 2
    assert session.base.num_classes == len(NAMES)  # the picked model is left as it was
    ranked = demo_app.top_k(session.injected, photo, k=len(NAMES) + 2)
    assert {name for name in ranked if name.startswith(demo_app.INJECTED_MARK)} == {
        demo_app.INJECTED_MARK + "okapi",
        demo_app.INJECTED_MARK + "red panda",
    }
    assert sum(ranked.values()) == pytest.approx(1.0, abs=1e-5)
    before, after = demo_app.predictions(session, photo)
    assert len(before) == len(after) == 5 and not any(name.startswith(demo_app.INJECTED_MARK) for name in before)
    assert demo_app.predictions(session, None) == (None, None)

    markdown = demo_app.diagnostics_markdown(session.injected)
    assert "### Injection 1: 2 classes" in markdown and "| 6 | okapi | a forest giraffe | user |" in markdown
    assert "**Calibration:** `norm`" in markdown

    with zipfile.ZipFile(session.archive) as archive:
        files = sorted(name for name in archive.namelist() if not name.endswith("/"))
        assert files == [f"injected-model/{n}" for n in ("README.md", "config.json", "model.safetensors")]
        archive.extractall(folder.parent / "unzipped")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_injected(folder.parent / "unzipped" / "injected-model")(x), session.injected(x))

    again = demo_app.run_injection(session, str(folder), "zebra", "", FAST)  # the same model is not loaded again
    assert again.base is session.base and again.injected.num_classes == len(NAMES) + 1
    with pytest.raises(ValueError, match="at least one class name"):
        demo_app.run_injection(demo_app.Session(), str(folder), " ,", "", FAST)


def test_default_settings_are_the_library_defaults():
    assert demo_app.InjectionSettings().kwargs() == {}
    assert FAST.kwargs().keys() == {"embedder", "config"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_page(url: str, process: subprocess.Popen | None = None, timeout: float = 120) -> str:
    """The page at ``url`` once it is served (polls; fails if ``process`` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the app exited with {process.returncode}: {process.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing served at {url} after {timeout} s")


def test_command_line_serves_on_localhost():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "examples/app.py", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert "classifier_injection" in _wait_for_page(f"http://127.0.0.1:{port}/", process)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _browser():
    """Headless Chromium through selenium, with nothing that reaches for the network."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
        "--window-size=1280,1100",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def _labels(text: str) -> list[str]:
    """The class names a Gradio Label shows: its text is title, headline, then name / percentage pairs."""
    lines = text.splitlines()[2:]
    return lines[0::2]


@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()), reason="needs chromium and chromium-driver")
def test_browser_session(tmp_path):
    """Type names, inject, upload a photo; the page shows the top-5 of the model it offers for download."""
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    server = demo_app.serve(port, FAST, block=False)
    driver = _browser()
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        names = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#names textarea, #names input"))
        names.send_keys("kitten, rocket ship")
        driver.find_element(By.CSS_SELECTOR, "#descriptions textarea").send_keys("rocket ship: a spacecraft")
        driver.find_element(By.CSS_SELECTOR, "#inject").click()
        wait.until(lambda d: "Injection 1: 2 classes" in d.find_element(By.ID, "diagnostics").text)
        photo = demo_app.sample_photos(demo_app.SAMPLES)[0]
        driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(photo))
        wait.until(lambda d: len(_labels(d.find_element(By.ID, "after").text)) == 5)
        shown_before = _labels(driver.find_element(By.ID, "before").text)
        shown_after = _labels(driver.find_element(By.ID, "after").text)
        assert "1001 rocket ship a spacecraft user" in driver.find_element(By.ID, "diagnostics").text.splitlines()
        link = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#download a"))
        urllib.request.urlretrieve(link.get_attribute("href"), tmp_path / "model.zip")
    finally:
        driver.quit()
        server.close()

    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        archive.extractall(tmp_path)
    downloaded = load_injected(tmp_path / "injected-model")
    assert downloaded.pretrained_cfg["label_names"][-2:] == ["kitten", "rocket ship"]
    image = Image.open(photo)
    assert shown_after == list(demo_app.top_k(downloaded, image))
    assert shown_before == list(demo_app.top_k(demo_app.load_model(demo_app.DEFAULT_MODEL), image))
