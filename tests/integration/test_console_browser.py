"""The console in a real headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium): log in with a token, find a dead letter, replay it, and watch its workflow
complete on the instance page. Screenshots of each page go to test-artifacts/console/."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from stepfleet.api import ApiSettings, create_app
from stepfleet.api.tokens import issue_token
from stepfleet.schemas import InstanceKey, InstanceStatus, TenantLimits, digest_of
from tests.integration.conftest import wait_for_status
from tests.integration.test_dead_letters import create_message
from tests.integration.test_fleet import dead_letter_of

pytestmark = pytest.mark.services

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def console_url(settings, tmp_path) -> Iterator[str]:
    """The API and console served by uvicorn on a thread of their own, reading the health
    files of workers started with one in `tmp_path`."""
    port = _free_port()
    api = ApiSettings(host="127.0.0.1", port=port, health_files=str(tmp_path / "*.health"))
    app = create_app(settings, api)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the console did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(20)


@pytest.fixture
def browser() -> Iterator[object]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "no /usr/bin/chromium and /usr/bin/chromedriver: `./dev check` installs Debian's "
            "chromium and chromium-driver (apt-get), which failed or was not run here"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _shot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height) + 40, 4000)))
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    driver.set_window_size(1400, 1000)


def _flow(driver, url: str, secret: str, tenant: str, letter_id: int, instance_id: str) -> str:
    """What a person does, in the browser; returns the status the instance page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 30)
    driver.get(url + "/")
    wait.until(ec.presence_of_element_located((By.ID, "token")))
    assert driver.current_url.endswith("/login")
    _shot(driver, "01-login")
    driver.find_element(By.ID, "token").send_keys("sft_not-a-token")
    driver.find_element(By.ID, "login").click()
    wait.until(ec.presence_of_element_located((By.ID, "login-error")))
    driver.find_element(By.ID, "token").send_keys(secret)
    driver.find_element(By.ID, "login").click()
    wait.until(ec.presence_of_element_located((By.ID, "steps-per-second")))
    _shot(driver, "02-overview")

    driver.find_element(By.ID, "nav-dead-letters").click()
    wait.until(ec.presence_of_element_located((By.ID, "letters")))
    tenant_box = driver.find_element(By.NAME, "tenant")
    tenant_box.clear()
    tenant_box.send_keys(tenant)
    Select(driver.find_element(By.ID, "reason")).select_by_value("unknown-module")
    driver.find_element(By.ID, "filter").click()
    wait.until(ec.presence_of_element_located((By.LINK_TEXT, str(letter_id))))
    _shot(driver, "03-dead-letters")

    driver.find_element(By.LINK_TEXT, str(letter_id)).click()
    wait.until(ec.presence_of_element_located((By.ID, "letter-reason")))
    assert driver.find_element(By.ID, "letter-reason").text == "unknown-module"
    _shot(driver, "04-dead-letter")
    driver.back()
    wait.until(ec.presence_of_element_located((By.ID, "letters")))
    driver.find_element(By.CSS_SELECTOR, f"input[name=ids][value='{letter_id}']").click()
    driver.find_element(By.ID, "replay-selected").click()
    wait.until(ec.presence_of_element_located((By.ID, "notice")))
    notice = driver.find_element(By.ID, "notice").text
    assert "1 letter(s) replayed" in notice, notice
    _shot(driver, "05-replayed")

    driver.get(f"{url}/instances?tenant={tenant}")
    wait.until(ec.presence_of_element_located((By.ID, "instances")))
    _shot(driver, "06-instances")
    driver.find_element(By.LINK_TEXT, instance_id).click()
    # htmx reloads the timeline every 2 s until the instance is finished.
    wait.until(ec.text_to_be_present_in_element((By.ID, "instance-status"), "complete"))
    status = driver.find_element(By.ID, "instance-status").text
    _shot(driver, "07-instance")

    driver.find_element(By.ID, "nav-tenants").click()
    wait.until(ec.presence_of_element_located((By.ID, "tenants")))
    _shot(driver, "08-tenants")
    return str(status)


def _timeline(driver, url: str, key: InstanceKey) -> list[str]:
    """The journal timeline of an instance that retried, slept, waited and compensated."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/instances/{key.tenant}/{key.instance_id}")
    WebDriverWait(driver, 30).until(
        ec.text_to_be_present_in_element((By.ID, "instance-status"), "errored")
    )
    _shot(driver, "09-timeline")
    kinds = [
        row.find_element(By.CLASS_NAME, "kind").text
        for row in driver.find_elements(By.CSS_SELECTOR, "#timeline li.entry:not(.head)")
    ]
    driver.get(url + "/")
    WebDriverWait(driver, 30).until(ec.presence_of_element_located((By.ID, "steps-per-second")))
    _shot(driver, "10-overview-after")
    return kinds


async def test_log_in_replay_a_dead_letter_and_see_the_workflow_complete(
    console_url, browser, store, broker, topology, start_worker, order_wasm, playbook, tmp_path
):
    await start_worker(health_file=tmp_path / "w1.health")
    tenant = f"web{uuid.uuid4().hex[:8]}"
    await store.tenants.add(tenant, None, TenantLimits(running_steps=8, steps_per_second=200))
    digest = digest_of(order_wasm)
    instance_id = f"order-{uuid.uuid4().hex[:8]}"
    await broker.publish_many([create_message(topology, tenant, instance_id, digest)])
    letter = await dead_letter_of(store, instance_id)
    assert letter.reason == "unknown-module"
    await store.put_module(tenant, digest, order_wasm)  # the cause, fixed
    name = f"oncall-{uuid.uuid4().hex[:6]}"
    _, secret = await issue_token(store, name, "operator", None, actor="tests")

    status = await asyncio.to_thread(
        _flow, browser, console_url, secret, tenant, letter.id, instance_id
    )
    assert status == "complete"
    record, _ = await wait_for_status(
        store, InstanceKey(tenant, instance_id), {InstanceStatus.COMPLETE}
    )
    assert record.status is InstanceStatus.COMPLETE
    entries = await store.dead_letters.audit_entries(action="dlq-replay", limit=50)
    assert any(e.actor == name and e.target == str(letter.id) for e in entries)

    eventful = await playbook(
        {"op": "do", "name": "reserve", "rollback": True},
        {"op": "do", "name": "flaky", "fail_times": 1, "retries": {"limit": 2, "delay_ms": 5}},
        {"op": "sleep", "name": "cool-off", "ms": 30},
        {"op": "wait", "name": "approval", "type": "approve", "timeout_ms": 50},
        {"op": "fail", "message": "out of stock"},
        tenant=tenant,
    )
    await wait_for_status(store, eventful, {InstanceStatus.ERRORED})
    kinds = await asyncio.to_thread(_timeline, browser, console_url, eventful)
    assert kinds == [
        "step succeeded",
        "attempt 1 failed",
        "step succeeded",
        "slept",
        "event timed out",
        "compensated",
    ]
