"""The web console in a real headless Chromium (Debian's package, driven by Selenium) against a real
controller (`asm controller serve --http-listen`) and real node agents: log in, see the fleet, start a run
and watch its text arrive live, reload the page mid-run and get the rest once, interrupt a run, drain and
undrain a node. A screenshot of the run page is written to the test's tmp dir."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asm_node.testing import ServedProcess, serve_controller
from tests.support.browser import chromium, have_browser
from tests.support.faults import py
from tests.support.processes import PYTHON_BASENAME, http_base, start_node_process

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TOKEN = "console-token-0123456789abcdef"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[ServedProcess, list[ServedProcess], str]]:
    (tmp_path / "token").write_text(TOKEN)
    nodes = [start_node_process(tmp_path, "--shell-allow", PYTHON_BASENAME, "--token-file", str(tmp_path / "token"))
             for _ in range(2)]
    try:
        ctl = serve_controller(tmp_path, *[a for n in nodes for a in ("--node", n.address)], "--token-file",
                               str(tmp_path / "token"), "--http-listen", "127.0.0.1:0", "--state", "memory:",
                               "--strategy", "priority", token=TOKEN)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    try:
        yield ctl, nodes, http_base(ctl)
    finally:
        ctl.stop()
        for n in nodes:
            n.stop()


def _wait(driver: Any, predicate: Any, timeout: float = 20.0, what: str = "") -> Any:
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate(driver)
            if value:
                return value
        except WebDriverException as exc:  # an element replaced under us: look again
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or predicate}: {last}")


def _gated_ticker(gate: Path, before: int, after: int) -> str:
    """Prints `before` numbered lines, waits (bounded) for `gate` to exist, then prints `after` more."""
    return py(f"import os, time\nfor i in range({before}):\n    print('line', i, flush=True)\n"
              f"deadline = time.monotonic() + 60\nwhile not os.path.exists({str(gate)!r}) and "
              f"time.monotonic() < deadline:\n    time.sleep(0.05)\n"
              f"for i in range({before}, {before + after}):\n    print('line', i, flush=True)")


def test_the_console_logs_in_runs_follows_resumes_interrupts_and_drains(
    fleet: tuple[ServedProcess, list[ServedProcess], str], tmp_path: Path,
) -> None:
    from selenium.webdriver.common.by import By

    _ctl, nodes, base = fleet
    with chromium(tmp_path) as driver:
        driver.get(base + "/")
        assert "token" not in driver.current_url
        # Login: a wrong token is refused, the right one shows the fleet.
        driver.find_element(By.ID, "token").send_keys("wrong-token-0123456789abcdef")
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        _wait(driver, lambda d: "refused" in d.find_element(By.ID, "login-error").text, what="the refusal")
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
        rows = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr[data-node]"), what="nodes")
        assert {r.get_attribute("data-node") for r in rows} == {n.address for n in nodes}
        assert TOKEN not in driver.current_url
        assert driver.execute_script("return sessionStorage.getItem('asm_token')") == TOKEN

        # Start a run from the form; its text appears live while it runs.
        gate = tmp_path / "gate"
        driver.get(base + "/#/new")
        _wait(driver, lambda d: d.find_element(By.ID, "new-prompt").is_displayed(), what="the form")
        driver.find_element(By.ID, "new-prompt").send_keys(_gated_ticker(gate, 3, 3))
        driver.find_element(By.CSS_SELECTOR, "#new-form button").click()
        _wait(driver, lambda d: "/#/run/" in d.current_url, what="the run page")
        events = driver.find_element(By.ID, "events")
        _wait(driver, lambda d: "line 2" in events.text, what="the first lines, live")
        assert "line 3" not in events.text  # the run waits at its gate: this text came while it ran
        assert driver.find_element(By.ID, "run-status").text == "running"

        # Reload mid-run (a new page, a new stream): every line once, then the rest as it comes.
        driver.refresh()
        events = _wait(driver, lambda d: d.find_element(By.ID, "events"), what="the events box")
        _wait(driver, lambda d: "line 2" in d.find_element(By.ID, "events").text, what="the replay")
        gate.touch()
        _wait(driver, lambda d: d.find_element(By.ID, "run-status").text == "completed", what="the end")
        text = driver.find_element(By.ID, "events").text
        assert [int(n) for n in re.findall(r"^line (\d+)$", text, re.M)] == list(range(6)), text
        driver.save_screenshot(str(tmp_path / "run-page.png"))
        assert (tmp_path / "run-page.png").stat().st_size > 1000

        # Interrupt another run from its page.
        gate2 = tmp_path / "gate2"
        driver.get(base + "/#/new")
        _wait(driver, lambda d: d.find_element(By.ID, "new-prompt").is_displayed(), what="the form")
        driver.find_element(By.ID, "new-prompt").send_keys(_gated_ticker(gate2, 1, 1))
        driver.find_element(By.CSS_SELECTOR, "#new-form button").click()
        _wait(driver, lambda d: "line 0" in d.find_element(By.ID, "events").text, what="the second run's text")
        driver.find_element(By.ID, "interrupt").click()
        _wait(driver, lambda d: d.find_element(By.ID, "run-status").text == "interrupted", what="the interrupt")
        # (the CLI's traceback on SIGINT is shown as stderr; its own output stopped at line 0)
        assert re.findall(r"^line (\d+)$", driver.find_element(By.ID, "events").text, re.M) == ["0"]

        # The runs list shows both, with their outcome.
        driver.get(base + "/#/runs")
        _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#run-list tbody tr")) >= 2, what="the runs")
        statuses = {r.find_element(By.CSS_SELECTOR, "td.status").text for r in
                    driver.find_elements(By.CSS_SELECTOR, "#run-list tbody tr")}
        assert {"completed", "interrupted"} <= statuses, statuses

        # Drain a node from the fleet page and see its state change; undrain it again.
        driver.get(base + "/#/")
        target = nodes[1].address
        row = f"#nodes tbody tr[data-node='{target}']"
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, row + " button.drain"), what="the drain button")
        driver.find_element(By.CSS_SELECTOR, row + " button.drain").click()
        _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, row + " td.state").text == "draining", what="draining")
        driver.find_element(By.CSS_SELECTOR, row + " button.undrain").click()
        _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, row + " td.state").text == "ready", what="ready")

        # Log out: the token leaves the tab.
        driver.find_element(By.ID, "logout").click()
        assert driver.execute_script("return sessionStorage.getItem('asm_token')") is None
        assert driver.find_element(By.ID, "login").is_displayed()


@pytest.mark.real_cli
def test_an_approval_answered_in_the_console_reaches_the_real_claude_cli(tmp_path: Path) -> None:
    """A Claude run asks before its Bash tool writes a file; Allow in the console: the CLI goes on and
    the file appears."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.support.cli_env import cli_env, find_cli, hermetic_env
    from tests.support.fake_model_server import FakeModelServer

    path = find_cli("claude")
    if path is None:
        pytest.skip("claude CLI not installed (run scripts/install_clis.sh)")
    server = FakeModelServer().start()
    try:
        env = hermetic_env({**cli_env("claude", server.base_url, tmp_path), "CLAUDE_CLI_PATH": str(path)})
        (tmp_path / "token").write_text(TOKEN)
        node = start_node_process(tmp_path, "--token-file", str(tmp_path / "token"), env=env, inherit=False)
        workspace = tmp_path / "ws"
        workspace.mkdir()
        try:
            ctl = serve_controller(tmp_path, "--node", node.address, "--token-file", str(tmp_path / "token"),
                                   "--http-listen", "127.0.0.1:0", "--state", "memory:", token=TOKEN)
            try:
                base = http_base(ctl)
                with chromium(tmp_path) as driver:
                    driver.get(base + "/")
                    driver.find_element(By.ID, "token").send_keys(TOKEN)
                    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
                    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr[data-node]"), what="nodes")
                    driver.get(base + "/#/new")
                    _wait(driver, lambda d: d.find_element(By.ID, "new-prompt").is_displayed(), what="the form")
                    Select(driver.find_element(By.ID, "new-provider")).select_by_visible_text("claude")
                    driver.find_element(By.ID, "new-prompt").send_keys("Write a file. SCENARIO_TOOLWRITE")
                    driver.find_element(By.ID, "new-cwd").send_keys(str(workspace))
                    driver.find_element(By.ID, "new-options").send_keys('{"approvals": true}')
                    driver.find_element(By.CSS_SELECTOR, "#new-form button").click()
                    allow = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#approvals .approval button.allow"),
                                  60, what="the approval card")
                    card = driver.find_element(By.CSS_SELECTOR, "#approvals .approval")
                    assert "Bash" in card.text and "touch" in card.text, card.text
                    assert not (workspace / "denied-file.txt").exists()
                    allow[0].click()
                    _wait(driver, lambda d: d.find_element(By.ID, "run-status").text == "completed", 60, what="the end")
                    assert "allow" in driver.find_element(By.CSS_SELECTOR, "#approvals .approval").text
                    assert (workspace / "denied-file.txt").exists()
                    driver.save_screenshot(str(tmp_path / "approval.png"))
            finally:
                ctl.stop()
        finally:
            node.stop()
    finally:
        server.stop()


async def test_the_provider_select_is_the_servers_registry(tmp_path: Path) -> None:
    """The form's provider options come from GET /v1/providers (authenticated): the registry's names, in its
    order, a provider registered in the controller's process included -- no list in the page to go stale."""
    import asyncio

    import httpx
    from selenium.webdriver.common.by import By

    from asm_controller.service import ControllerConfig, start_controller
    from asm_node import NodeAgent, start_server
    from asm_node.providers import ShellProvider, build_providers, provider_names, register, unregister
    from tests.support.processes import node_config

    if not have_browser():
        pytest.skip("chromium/chromedriver are not installed (scripts/install_chromium.sh)")

    class ConsoleToy(ShellProvider):
        name = "console-toy"
        display_name = "Console toy"

    def browse(base: str) -> list[tuple[str, str, str]]:
        with chromium(tmp_path) as driver:
            driver.get(base + "/")
            driver.find_element(By.ID, "token").send_keys(TOKEN)
            driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
            _wait(driver, lambda d: d.find_element(By.ID, "fleet").is_displayed(), what="the fleet page")
            driver.get(base + "/#/new")
            _wait(driver, lambda d: d.find_element(By.ID, "new-prompt").is_displayed(), what="the form")
            return [(o.get_attribute("value"), o.text, o.get_attribute("title"))
                    for o in driver.find_elements(By.CSS_SELECTOR, "#new-provider option")]

    async def scenario() -> tuple[list[tuple[str, str, str]], tuple[str, ...]]:
        config = node_config()
        node = await start_server(config, NodeAgent(config, providers=build_providers(config)))
        try:
            ctl = await start_controller(ControllerConfig(listen="127.0.0.1:0", nodes=[f"127.0.0.1:{node.port}"],
                                                          token=TOKEN, http_listen="127.0.0.1:0"))
        except BaseException:
            await node.stop()
            raise
        try:
            base = f"http://127.0.0.1:{ctl.http_port}"
            async with httpx.AsyncClient(base_url=base) as client:
                refused = await client.get("/v1/providers")
                assert refused.status_code == 401 and refused.json()["error"]["kind"] == "auth_error"
                listed = await client.get("/v1/providers", headers={"Authorization": f"Bearer {TOKEN}"})
                assert [m["provider"] for m in listed.json()["providers"]] == list(provider_names())
            # The browser blocks: it runs in a thread while this loop serves the controller.
            return await asyncio.to_thread(browse, base), provider_names()
        finally:
            await ctl.stop()
            await node.stop()

    register(ConsoleToy)
    try:
        options, names = await scenario()
    finally:
        unregister("console-toy")
    assert names[-1] == "console-toy"
    assert [value for value, _, _ in options] == list(names)
    assert [text for _, text, _ in options] == list(names)
    assert options[-1] == ("console-toy", "console-toy", "Console toy")
    assert ("shell", "shell", "Shell") in options
