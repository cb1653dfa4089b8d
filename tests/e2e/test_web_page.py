"""The web page at ``/``, driven in a real headless Chromium (Debian's chromium + chromedriver, through Selenium)
against a real `gemma-sessions serve` process with API keys, on a tiny random Gemma 3 written as an HF directory.

One server, one browser for the module; the tests run in order and build on each other (a conversation made in one
is forked, exported and deleted in the next ones). Each view is saved as a screenshot under the artifact folder
(``$GEMMA_SESSIONS_ARTIFACTS/web``, default ``tests/e2e/artifacts/web``), and axe-core (vendored under
``assets/axe-core``) checks each one for serious or critical accessibility violations.

What the tiny model writes is random text; where a test needs a reply with particular text (``<script>``), the reply
is an assistant item added through the conversations API, shown through the same path as a generated one.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
from safetensors.torch import save_file
from selenium import webdriver
from selenium.common.exceptions import (NoSuchElementException, StaleElementReferenceException,
                                        TimeoutException)
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from gemma_sessions.config import ModelConfig
from gemma_sessions.testing import random_tensors, tiny_hf_config, tiny_tokenizer, write_sentencepiece_model

from servers import KEY_A, KEY_B, Server, free_port

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's; `make system` installs them
AXE = Path(__file__).parent / "assets" / "axe-core" / "axe.min.js"
ARTIFACTS = Path(os.environ.get("GEMMA_SESSIONS_ARTIFACTS", Path(__file__).parent / "artifacts")) / "web"
NAME = "gemma3-tiny"
WIDE, PHONE = (1440, 900), (375, 812)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Gemma 3 as an HF directory (config.json, model.safetensors, tokenizer.model), 2k context."""
    path = tmp_path_factory.mktemp("gemma3-tiny")
    cfg = dict(tiny_hf_config("gemma3"), max_position_embeddings=2048, architectures=["Gemma3ForCausalLM"])
    tensors = random_tensors(ModelConfig.from_hf_config(cfg), seed=2)  # seed 2 writes letters, not only "\n"
    save_file({f"model.{k}.weight": v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    write_sentencepiece_model(path / "tokenizer.model", tiny_tokenizer(cfg["vocab_size"]))
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("web-store"), free_port(),
               ["--model", str(model_dir), "--dtype", "float32", "--served-model-name", NAME]).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(server, downloads):
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-extensions", f"--window-size={WIDE[0]},{WIDE[1]}"):
        opts.add_argument(arg)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    # the driver named explicitly: selenium-manager never runs, nothing is downloaded
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_script_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    resize(driver, WIDE)
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------------ helpers


def resize(driver, size) -> None:
    w, h = size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": w < 800})
    assert driver.execute_script("return window.innerWidth") == w


def wait(driver, cond, timeout: float = 30, what: str = ""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(
        NoSuchElementException, StaleElementReferenceException)).until(lambda d: cond(d), what)


def find(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def finds(driver, css: str):
    return driver.find_elements(By.CSS_SELECTOR, css)


def shot(driver, name: str) -> None:
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def api(server, method: str, path: str, key: str = KEY_A, **kw) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers=server.headers(key), timeout=60, **kw)


def current_id(driver) -> str:
    return wait(driver, lambda d: d.execute_script(
        "return document.querySelector('.session-item[aria-current=true]')?.dataset.id"), what="a selected session")


def messages(driver) -> list:
    return finds(driver, "#messages article.msg")


def idle(driver) -> bool:
    """No reply streaming and the page re-rendered from the server (no pending bubble)."""
    return driver.execute_script("return document.getElementById('stop-button').hidden "
                                 "&& !document.querySelector('.msg.pending')")


def settings(driver, **fields) -> None:
    """Fill the details panel's settings form and save (the panel is a drawer below 1200 px: opened first)."""
    if not find(driver, "#set-title").is_displayed():
        find(driver, "#toggle-details").click()
        wait(driver, lambda d: find(d, "#set-title").is_displayed())
    for field_id, value in fields.items():
        el = find(driver, f"#{field_id}")
        el.clear()
        el.send_keys(str(value))
    # an earlier save's "Saved" stays up for 2.5 s: clear it, so the wait is for this save's
    driver.execute_script("document.getElementById('settings-saved').textContent = ''")
    find(driver, "#save-settings").click()
    wait(driver, lambda d: find(d, "#settings-saved").text == "Saved")


def axe(driver, view: str) -> None:
    """Run axe-core on the page as it is; no serious or critical violation (the report goes to the artifacts)."""
    if not driver.execute_script("return typeof axe !== 'undefined'"):
        driver.execute_script(AXE.read_text())
    result = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        axe.run(document, {resultTypes: ['violations']})
           .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                                   targets: v.nodes.slice(0, 5).map(n => n.target)}))))
           .catch(e => done('axe failed: ' + e));""")
    assert isinstance(result, list), result
    (ARTIFACTS / f"axe-{view}.json").write_text(json.dumps(result, indent=1))
    bad = [v for v in result if v["impact"] in ("serious", "critical")]
    assert not bad, f"{view}: {bad}"


def keys(driver, *typed: str) -> None:
    """Type into whatever has the focus, as a keyboard would (no element is picked)."""
    ActionChains(driver).send_keys(*typed).perform()


def send_message(driver, text: str) -> None:
    box = find(driver, "#composer-input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


# ------------------------------------------------------------------------------------------------ tests


def test_page_is_public_and_a_wrong_key_is_refused(server, browser):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]  # nothing inline could ever run
    for asset in ("app.js", "markdown.js", "chart.js", "app.css"):
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200
    assert httpx.get(f"{server.url}/v1/sessions").status_code == 401  # the page is public, the API is not

    browser.get(server.url)
    dialog = find(browser, "#key-dialog")
    wait(browser, lambda d: dialog.is_displayed(), what="the key dialog")
    axe(browser, "key-dialog")
    find(browser, "#key-input").send_keys("not-a-key" + Keys.ENTER)
    wait(browser, lambda d: "refused" in find(d, "#key-error").text, what="the refusal")
    assert "missing or invalid API key" in find(browser, "#key-error").text  # the server's reason
    assert dialog.is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('gemma-sessions.api-key')") is None
    shot(browser, "01-wrong-key")
    key = find(browser, "#key-input")
    key.clear()
    key.send_keys(KEY_A + Keys.ENTER)
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), what="the page")
    assert not dialog.is_displayed()
    assert find(browser, "#model-name").text == NAME
    assert browser.execute_script("return sessionStorage.getItem('gemma-sessions.api-key')") == KEY_A


def test_two_turns_stream_and_the_second_is_served_from_the_cache(server, browser):
    find(browser, "#new-session").click()
    find(browser, "#new-name").send_keys("Cache demo")
    find(browser, "#new-system").send_keys("You are terse.")
    find(browser, "#new-create").click()
    sid = current_id(browser)
    assert find(browser, "#chat-title").text == "Cache demo"
    settings(browser, **{"set-temperature": 0, "set-max-tokens": 24})
    meta = api(server, "GET", f"/v1/sessions/{sid}").json()
    assert meta["system"] == "You are terse." and meta["metadata"]["temperature"] == "0"

    browser.execute_script("""  // every length the reply had on screen while it streamed
        window.__lengths = [];
        new MutationObserver(() => {
          const b = document.querySelector('#messages .msg.pending .msg-body');
          if (b) window.__lengths.push(b.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")
    send_message(browser, "hello there")  # Enter sends
    wait(browser, lambda d: len(messages(d)) == 2 and idle(d), what="turn 1")
    lengths = browser.execute_script("return window.__lengths")
    assert len(set(lengths)) >= 3 and max(lengths) > 0, lengths  # shown as it arrived, not all at once

    box = find(browser, "#composer-input")  # Shift+Enter is a new line, Enter sends
    box.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.NULL, "second line")
    assert box.get_attribute("value") == "first line\nsecond line"
    box.send_keys(Keys.ENTER)
    wait(browser, lambda d: len(messages(d)) == 4 and idle(d), what="turn 2")

    history = api(server, "GET", f"/v1/sessions/{sid}").json()["messages"]
    assert [m["role"] for m in history] == ["user", "model", "user", "model"]
    assert history[2]["text"] == "first line\nsecond line"
    shown = [m.text for m in finds(browser, "#messages article.msg .msg-body")]
    for m, text in zip(history, shown):
        assert "".join(text.split()) == "".join(m["text"].split())  # the reply on screen is the stored one

    turns = api(server, "GET", f"/v1/sessions/{sid}/turns").json()["data"]
    assert [t["turn"] for t in turns] == [1, 2] and turns[1]["cached_tokens"] > 0
    assert turns[1]["cached_tokens"] + turns[1]["prefilled_tokens"] == turns[1]["prompt_tokens"]
    bar = wait(browser, lambda d: finds(d, '#turn-chart rect[data-turn="2"][data-kind="cached"]'), what="chart")
    assert int(bar[0].get_attribute("data-value")) == turns[1]["cached_tokens"] > 0
    assert float(bar[0].get_attribute("height")) > 0
    cell = find(browser, '#turn-table tr[data-turn="2"] td[data-key="cached"]')
    assert int(cell.text) == turns[1]["cached_tokens"]
    assert find(browser, '#turn-table tr[data-turn="2"] td[data-key="ttft"]').text.endswith("ms")
    assert find(browser, ".session-item[aria-current=true] .session-meta").text.startswith("2 turns")
    shot(browser, "02-chat-1440")
    axe(browser, "chat-1440")


def test_fork_at_turn_1_and_continue_the_fork(server, browser):
    parent = current_id(browser)
    fork = find(browser, 'button.fork-here[data-turn="1"]')
    assert fork.get_attribute("textContent") == "Fork here at turn 1"  # its name for a screen reader
    fork.click()
    wait(browser, lambda d: current_id(d) != parent, what="the fork opened")
    child = current_id(browser)
    assert "fork at turn 1" in find(browser, "#chat-title").text
    assert len(messages(browser)) == 2
    send_message(browser, "and now something else")
    wait(browser, lambda d: len(messages(d)) == 4 and idle(d), what="the fork's turn")
    view = api(server, "GET", f"/v1/sessions/{child}").json()
    assert view["metadata"]["forked_from"] == parent and len(view["messages"]) == 4
    assert view["messages"][2]["text"] == "and now something else"
    assert len(api(server, "GET", f"/v1/sessions/{parent}").json()["messages"]) == 4  # the parent is untouched
    turns = api(server, "GET", f"/v1/sessions/{child}/turns").json()["data"]
    assert turns[0]["cached_tokens"] > 0  # the fork continued on its parent's KV
    assert finds(browser, '.session-item[aria-current=true] .tag')[0].text == "fork"
    shot(browser, "03-fork")


def test_export_then_import_by_drag_and_drop(server, browser, downloads):
    source = current_id(browser)
    find(browser, "#export-button").click()
    files = wait(browser, lambda d: [p for p in downloads.glob("*.gsession")] or None, what="the download")
    wait(browser, lambda d: not list(downloads.glob("*.crdownload")))
    data = files[0].read_bytes()
    assert len(data) > 1000
    before = {s["id"] for s in api(server, "GET", "/v1/sessions?limit=100").json()["data"]}

    browser.execute_script("""
        const [b64, name] = arguments;
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'application/octet-stream'}));
        const zone = document.getElementById('drop-zone');
        for (const type of ['dragenter', 'dragover', 'drop'])
          zone.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt}));
    """, base64.b64encode(data).decode(), files[0].name)
    wait(browser, lambda d: "Imported" in find(d, "#notice").text, what="the import")
    imported = current_id(browser)
    assert imported not in before and imported != source
    src, new = (api(server, "GET", f"/v1/sessions/{i}").json() for i in (source, imported))
    assert [m["text"] for m in new["messages"]] == [m["text"] for m in src["messages"]]
    assert len(messages(browser)) == len(src["messages"])
    assert new["metadata"]["imported_from"] == files[0].name
    assert find(browser, ".session-item[aria-current=true] .tag").text == "imported"
    shot(browser, "04-imported")


def test_a_damaged_file_is_refused_with_the_servers_reason(server, browser, downloads, tmp_path):
    data = bytearray(next(downloads.glob("*.gsession")).read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern in the KV data
    damaged = tmp_path / "damaged.gsession"
    damaged.write_bytes(bytes(data))
    reason = api(server, "POST", "/v1/sessions/import", content=bytes(data)).json()["error"]["message"]
    assert "checksum" in reason
    n = len(api(server, "GET", "/v1/sessions?limit=100").json()["data"])
    find(browser, "#import-file").send_keys(str(damaged))  # the drop zone's file chooser, as a keyboard user would
    wait(browser, lambda d: "refused" in find(d, "#notice").text, what="the refusal")
    notice = find(browser, "#notice")
    assert notice.get_attribute("role") == "alert" and "error" in notice.get_attribute("class")
    assert reason in notice.text and "damaged.gsession" in notice.text
    assert len(api(server, "GET", "/v1/sessions?limit=100").json()["data"]) == n  # nothing was created
    shot(browser, "05-damaged-file")


def test_a_reply_with_script_is_shown_as_text(server, browser):
    evil = ("<script>window.__pwned = 1</script> and <img src=x onerror=\"window.__pwned = 2\">\n\n"
            "**bold** [click](javascript:window.__pwned=3) `<b>code</b>`\n\n"
            "```html\n<script>window.__pwned = 4</script>\n```")
    conv = api(server, "POST", "/v1/conversations", json={"metadata": {"title": "Untrusted reply"}}).json()
    api(server, "POST", f"/v1/conversations/{conv['id']}/items", json={"items": [
        {"type": "message", "role": "user", "content": "show me <i>markup</i>"},
        {"type": "message", "role": "assistant", "content": evil}]}).raise_for_status()
    browser.refresh()  # the key survives a reload: it is kept for the tab
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), what="reload")
    assert not find(browser, "#key-dialog").is_displayed()
    find(browser, f'.session-item[data-id="{conv["id"][5:]}"]').click()
    reply = wait(browser, lambda d: finds(d, "#messages article.msg.assistant .msg-body"), what="the reply")[0]
    assert "<script>window.__pwned = 1</script>" in reply.text
    assert "<img src=x onerror=" in reply.text
    assert "<b>code</b>" in find(browser, "#messages article.msg.assistant .msg-body p code").text
    assert "<script>window.__pwned = 4</script>" in find(browser, "#messages .code-block code").text
    assert find(browser, "#messages strong").text == "bold"
    assert not finds(browser, "#messages script, #messages img, #messages a, #messages i, #messages b")
    assert "<i>markup</i>" in find(browser, "#messages article.msg.user").text
    assert browser.execute_script("return window.__pwned") is None
    shot(browser, "06-script-as-text")


def test_escape_stops_a_reply_mid_way(server, browser):
    sid = _session_titled(server, "Cache demo")
    find(browser, f'.session-item[data-id="{sid}"]').click()
    wait(browser, lambda d: current_id(d) == sid)
    settings(browser, **{"set-max-tokens": 1500})
    n = len(api(server, "GET", f"/v1/sessions/{sid}").json()["messages"])
    cancelled = api(server, "GET", "/v1/stats").json()["requests"]["cancelled"]
    send_message(browser, "a long answer please")
    wait(browser, lambda d: int(find(d, ".msg.pending").get_attribute("data-deltas")) >= 3, what="a few tokens")
    assert not find(browser, "#stop-button").get_attribute("hidden")
    shot(browser, "07-streaming")
    t0 = time.time()
    find(browser, "#composer-input").send_keys(Keys.ESCAPE)
    bubble = wait(browser, lambda d: finds(d, "#messages .msg.stopped"), timeout=10, what="stopped")[0]
    assert time.time() - t0 < 10
    assert "not kept" in bubble.text
    assert find(browser, "#composer-input").get_attribute("value") == "a long answer please"  # to send again
    assert find(browser, "#send-button").is_displayed()
    stats = wait(browser, lambda d: (s := api(server, "GET", "/v1/stats").json())["requests"]["running"] == 0 and s,
                 what="the generation ended")
    assert stats["requests"]["cancelled"] == cancelled + 1
    assert len(api(server, "GET", f"/v1/sessions/{sid}").json()["messages"]) == n  # nothing appended
    assert len(api(server, "GET", f"/v1/sessions/{sid}/turns").json()["data"]) == 2
    shot(browser, "08-stopped")
    find(browser, "#composer-input").clear()
    settings(browser, **{"set-max-tokens": 24})


def _session_titled(server, title: str) -> str:
    return next(s["id"] for s in api(server, "GET", "/v1/sessions?limit=100").json()["data"]
                if s["metadata"].get("title") == title)


def test_session_list_search_sort_and_rename(server, browser):
    sid = current_id(browser)
    settings(browser, **{"set-title": "Renamed demo"})
    wait(browser, lambda d: find(d, "#chat-title").text == "Renamed demo")
    assert api(server, "GET", f"/v1/sessions/{sid}").json()["metadata"]["title"] == "Renamed demo"
    names = lambda d: d.execute_script(  # noqa: E731 (read at once: the list re-renders)
        "return [...document.querySelectorAll('#session-list .session-name')].map(e => e.textContent)")

    # by last use: the list is the server's sessions, most recently used first; a turn moves one to the top
    other = _session_titled(server, "Untrusted reply")
    find(browser, f'.session-item[data-id="{other}"]').click()
    wait(browser, lambda d: current_id(d) == other)
    send_message(browser, "one more")
    wait(browser, lambda d: len(messages(d)) == 4 and idle(d), what="the turn")
    wait(browser, lambda d: names(d)[0] == "Untrusted reply", what="moved to the top")
    data = api(server, "GET", "/v1/sessions?limit=100&order=desc").json()["data"]  # what the page asks for
    by_use = sorted(data, key=lambda s: -s["last_used_at"])  # (stable: a fork's tie with its parent keeps that order)
    assert [s["id"] for s in by_use][:1] == [other]
    assert browser.execute_script("return [...document.querySelectorAll('#session-list .session-item')]"
                                  ".map(e => e.dataset.id)") == [s["id"] for s in by_use]

    Select(find(browser, "#session-sort")).select_by_visible_text("Title")
    wait(browser, lambda d: names(d) == sorted(names(d), key=str.lower))
    search = find(browser, "#session-search")
    search.send_keys("renamed")
    wait(browser, lambda d: names(d) == ["Renamed demo"], what="search")
    search.send_keys(Keys.CONTROL, "a", Keys.NULL, Keys.BACKSPACE)
    wait(browser, lambda d: len(names(d)) == len(data))
    Select(find(browser, "#session-sort")).select_by_visible_text("Last used")
    shot(browser, "09-list")


def test_delete_asks_first(server, browser):
    victim = _session_titled(server, "Untrusted reply")
    find(browser, f'.session-item[data-id="{victim}"]').click()
    wait(browser, lambda d: current_id(d) == victim)
    find(browser, "#delete-button").click()
    dialog = find(browser, "#confirm-dialog")
    wait(browser, lambda d: dialog.is_displayed())
    assert "Untrusted reply" in find(browser, "#confirm-text").text
    shot(browser, "10-delete-confirm")
    axe(browser, "delete-confirm")
    find(browser, "#confirm-cancel").click()
    assert api(server, "GET", f"/v1/sessions/{victim}").status_code == 200  # cancelled: still there
    find(browser, "#delete-button").click()
    wait(browser, lambda d: dialog.is_displayed())
    find(browser, "#confirm-delete").click()
    wait(browser, lambda d: "Deleted" in find(d, "#notice").text, what="deleted")
    assert not finds(browser, f'.session-item[data-id="{victim}"]')
    assert api(server, "GET", f"/v1/sessions/{victim}").status_code == 404


def test_server_live_view(server, browser):
    find(browser, "#tab-server").click()
    wait(browser, lambda d: find(d, '#kv-stats dd[data-stat="kv-used"]').text, what="the first reading")
    body = {"model": NAME, "input": "go on", "max_output_tokens": 400, "temperature": 0, "stream": True}
    done = threading.Event()

    def generate():  # a reply streaming elsewhere while the page watches
        with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=server.headers(), timeout=120) as r:
            for _ in r.iter_lines():
                pass
        done.set()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    try:
        wait(browser, lambda d: find(d, '#queue-stats dd[data-stat="running"]').text == "1"
             and float(find(d, "#tput-now").text) > 0, what="the running request and its throughput")
        shot(browser, "11-server")
        axe(browser, "server")
    finally:
        worker.join(120)
    assert done.is_set()
    stats = api(server, "GET", "/v1/stats").json()
    used = find(browser, '#kv-stats dd[data-stat="kv-used"]').text
    assert used.endswith(f"/ {stats['kv']['blocks_total']} pages")
    assert int(find(browser, '#sessions-stats dd[data-stat="loaded"]').text) >= 3
    assert stats["tokens"]["generated_total"] > 0 and stats["sessions"]["loaded"] >= 3
    find(browser, "#tab-chat").click()


def test_another_key_sees_none_of_these_sessions(server, browser):
    find(browser, "#key-button").click()
    find(browser, "#key-input").send_keys(KEY_B + Keys.ENTER)
    wait(browser, lambda d: not find(d, "#key-dialog").is_displayed())
    wait(browser, lambda d: find(d, "#session-empty").is_displayed(), what="an empty list")
    assert not finds(browser, "#session-list .session-item")
    assert api(server, "GET", "/v1/sessions", key=KEY_B).json()["data"] == []
    mine = _session_titled(server, "Renamed demo")  # the page's own routes keep ownership too
    assert api(server, "GET", f"/v1/sessions/{mine}/turns", key=KEY_B).status_code == 404
    assert api(server, "GET", f"/v1/sessions/{mine}/turns").status_code == 200
    assert httpx.get(f"{server.url}/v1/stats").status_code == 401
    assert httpx.get(f"{server.url}/v1/sessions/{mine}/turns").status_code == 401
    find(browser, "#key-button").click()
    find(browser, "#key-input").send_keys(KEY_A + Keys.ENTER)
    wait(browser, lambda d: len(finds(d, "#session-list .session-item")) >= 3, what="key A's sessions again")


def test_phone_width_keyboard_only(server, browser):
    resize(browser, PHONE)
    try:
        no_overflow = "return document.documentElement.scrollWidth <= window.innerWidth"
        assert browser.execute_script(no_overflow)
        wait(browser, lambda d: not _in_view(d, "#new-session"), what="the sessions panel folded into a drawer")
        # keyboard only: Tab to the sessions button, open it, make a conversation, send a turn, close with Esc
        browser.execute_script("document.activeElement.blur()")
        _tab_to(browser, "toggle-sessions")
        keys(browser, Keys.ENTER)
        wait(browser, lambda d: _in_view(d, "#new-session"), what="the sessions drawer")
        shot(browser, "12-phone-sessions")
        axe(browser, "phone-sessions")
        _tab_to(browser, "new-session")
        keys(browser, Keys.ENTER)
        wait(browser, lambda d: find(d, "#new-dialog").is_displayed())
        keys(browser, "On the phone" + Keys.ENTER)  # focus is in the title field
        wait(browser, lambda d: find(d, "#chat-title").text == "On the phone", what="created")
        assert browser.switch_to.active_element.get_attribute("id") == "composer-input"
        wait(browser, lambda d: not _in_view(d, "#new-session"), what="the drawer closed on opening the conversation")
        sid = current_id(browser)
        keys(browser, "typed on a phone" + Keys.ENTER)
        wait(browser, lambda d: len(messages(d)) == 2 and idle(d), what="the phone turn")
        assert api(server, "GET", f"/v1/sessions/{sid}").json()["messages"][0]["text"] == "typed on a phone"
        assert browser.execute_script(no_overflow)
        assert _in_view(browser, "#composer-input") and _in_view(browser, "#send-button")
        shot(browser, "13-phone-chat")
        axe(browser, "phone-chat")
        find(browser, "#toggle-details").click()
        wait(browser, lambda d: _in_view(d, "#turn-chart"), what="the details drawer")
        assert finds(browser, '#turn-chart rect[data-turn="1"]')
        shot(browser, "14-phone-details")
        keys(browser, Keys.ESCAPE)
        wait(browser, lambda d: not _in_view(d, "#turn-chart"), what="Esc closes the drawer")
        find(browser, "#tab-server").click()
        wait(browser, lambda d: find(d, '#kv-stats dd[data-stat="kv-used"]').text)
        assert browser.execute_script(no_overflow)
        shot(browser, "15-phone-server")
        find(browser, "#tab-chat").click()
    finally:
        resize(browser, WIDE)


def _in_view(driver, css: str) -> bool:
    """The element is visible and wholly inside the viewport's width (a drawer that has finished sliding in; a
    closed one is off screen and hidden)."""
    return driver.execute_script("""
        const el = document.querySelector(arguments[0]);
        if (!el || getComputedStyle(el).visibility === 'hidden') return false;
        const r = el.getBoundingClientRect();
        return r.width > 0 && r.left >= -1 && r.right <= window.innerWidth + 1 && r.bottom > 0
               && r.top < window.innerHeight;""", css)


def _tab_to(driver, element_id: str, limit: int = 40) -> None:
    for _ in range(limit):
        if driver.switch_to.active_element.get_attribute("id") == element_id:
            return
        keys(driver, Keys.TAB)
    raise TimeoutException(f"Tab never reached #{element_id}")


def test_load_more_reaches_every_session_by_keyboard(server, browser):
    """More sessions than a page: "Load more" appends the next pages (`?page_size=2` in the page's URL stands in for
    the page's 100), by keyboard, without duplicates, and goes away after the last one; a delete keeps them loaded."""
    made = [api(server, "POST", "/v1/conversations", key=KEY_B, json={"metadata": {"title": f"Paged {i}"}}).json()
            ["id"][5:] for i in range(5)]  # key B's only sessions (the test before checks it has none)
    browser.get(f"{server.url}/?page_size=2")
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready === 'true'"), what="the page")
    find(browser, "#key-button").click()
    find(browser, "#key-input").send_keys(KEY_B + Keys.ENTER)
    shown = lambda d: d.execute_script(  # noqa: E731 (read at once: the list re-renders)
        "return [...document.querySelectorAll('#session-list .session-item')].map(e => e.dataset.id)")
    newest = [s["id"] for s in api(server, "GET", "/v1/sessions?limit=100&order=desc", key=KEY_B).json()["data"]]
    assert sorted(newest) == sorted(made)
    wait(browser, lambda d: sorted(shown(d)) == sorted(newest[:2]), what="key B's first page")
    more = find(browser, "#load-more")
    assert more.is_displayed() and more.tag_name == "button"
    assert more.get_attribute("textContent") == "Load more conversations"  # its name for a screen reader
    shot(browser, "16-load-more")
    axe(browser, "load-more")

    browser.execute_script("document.activeElement.blur()")
    _tab_to(browser, "load-more")  # reached by Tab, pressed with Enter
    keys(browser, Keys.ENTER)
    wait(browser, lambda d: len(shown(d)) == 4, what="the second page")
    assert more.is_displayed() and browser.switch_to.active_element.get_attribute("id") == "load-more"
    keys(browser, Keys.ENTER)
    wait(browser, lambda d: len(shown(d)) == 5, what="the last page")
    wait(browser, lambda d: not more.is_displayed(), what="no more to load")
    ids = shown(browser)
    assert len(set(ids)) == len(ids) and set(ids) == set(made)
    assert browser.switch_to.active_element.get_attribute("data-id") == newest[-1]  # the first one it loaded
    Select(find(browser, "#session-sort")).select_by_visible_text("Title")  # sort and search see every page
    wait(browser, lambda d: shown(d) == made, what="sorted by title")
    find(browser, "#session-search").send_keys("Paged 0")
    wait(browser, lambda d: shown(d) == [made[0]], what="search")
    find(browser, "#session-search").send_keys(Keys.CONTROL, "a", Keys.NULL, Keys.BACKSPACE)
    Select(find(browser, "#session-sort")).select_by_visible_text("Last used")

    find(browser, f'.session-item[data-id="{newest[0]}"]').click()  # a delete reloads what was loaded, not one page
    wait(browser, lambda d: current_id(d) == newest[0])
    find(browser, "#delete-button").click()
    wait(browser, lambda d: find(d, "#confirm-dialog").is_displayed())
    find(browser, "#confirm-delete").click()
    wait(browser, lambda d: "Deleted" in find(d, "#notice").text, what="deleted")
    wait(browser, lambda d: sorted(shown(d)) == sorted(newest[1:]), what="the other four")
    assert not more.is_displayed()
