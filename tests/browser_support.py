"""Real-browser testing of the demo page: Debian's Chromium driven by Playwright (local mode).

A pytest plugin (test_browser.py loads it with `pytest_plugins`): the `browser` and
`open_page` fixtures, a DemoPage wrapper that knows the page's element ids, and a screenshot
of every open page when a test fails, saved under .run/artifacts/ and named in the report.
"""
import os
import re

import pytest

from repo import REPO

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:
    # The tests image has no browser and skips these tests (marker `local`); it still
    # imports this module while collecting. Locally, a missing Playwright must be loud.
    if os.environ.get("STACK_MODE", "local") == "local":
        raise
    expect = sync_playwright = None

CHROMIUM = "/usr/bin/chromium"  # Debian's package: Playwright's own browser download is not reachable
# As root, without a sandbox; and no background traffic to Google's hosts, which only fails here.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = REPO / ".run" / "artifacts"
TIMEOUT_MS = 10_000  # every action and expectation; a test that needs longer says so
PAGES = pytest.StashKey[list]()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=30_000)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, request):
    """open_page(url, **context_options) -> DemoPage, each in a fresh browser context (no shared
    storage: another browser, another user); the options go to Playwright's new_context (e.g.
    ignore_https_errors=True). open_page(url, tab_of=demo) opens a second tab of demo's browser
    instead (same localStorage: the same signed-in user)."""
    expect.set_options(timeout=TIMEOUT_MS)
    pages = request.node.stash.setdefault(PAGES, [])
    contexts = []

    def open_(url, tab_of=None, **context_options):
        if tab_of is None:
            context = browser.new_context(**context_options)
            contexts.append(context)
            context.set_default_timeout(TIMEOUT_MS)
        else:
            context = tab_of.page.context
        demo = DemoPage(context.new_page())
        pages.append(demo)
        demo.page.goto(url)
        return demo

    yield open_
    for context in contexts:
        context.close()


class DemoPage:
    """The demo page (nginx/html/), through its element ids; records what a user would not see."""

    def __init__(self, page):
        self.page = page
        self.dialogs = []  # alert()/confirm()/prompt(): injected script would show up here
        self.errors = []  # uncaught exceptions and Content-Security-Policy violations
        self.websockets = []  # URLs the page opened, in order
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on("console", self._on_console)
        page.on("websocket", lambda ws: self.websockets.append(ws.url))
        self.echo_state = page.locator("#echo-state")
        self.echo_log = page.locator("#echo-log li")
        self.chat_state = page.locator("#chat-state")
        self.messages = page.locator("#chat-messages li")
        self.texts = page.locator("#chat-messages li .text")
        self.members = page.locator("#chat-members li")
        self.member_count = page.locator("#chat-count")
        self.recovery = page.locator("#chat-recovery")

    def _on_dialog(self, dialog):
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _on_console(self, message):
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def choose_backend(self, backend):
        self.page.check(f'input[name="backend"][value="{backend}"]')

    def echo(self, text):
        expect(self.echo_state).to_have_attribute("data-state", "open")
        self.page.fill("#echo-input", text)
        self.page.click("#echo-send")

    def sign_in(self, name):
        self.page.fill("#chat-name", name)
        self.page.click("#chat-signin-button")
        expect(self.page.locator("#chat-me")).to_have_text(f"Signed in as {name}")

    def identity(self):
        """What the page keeps in localStorage: {token, expires_at, user: {id, name}}, or None."""
        return self.page.evaluate("() => JSON.parse(localStorage.getItem('wsstack.chat.identity'))")

    def join(self, room, user=None):
        """Join `room`, signing in as `user` first when given."""
        if user is not None:
            self.sign_in(user)
        self.page.fill("#chat-room", room)
        self.page.click("#chat-join-button")
        expect(self.chat_state).to_have_attribute("data-state", "connected")
        # The presence snapshot comes after the history: then the page has the whole start.
        expect(self.member_count).not_to_have_text("0 in the room")

    def leave(self):
        self.page.click("#chat-join-button")
        expect(self.chat_state).to_have_attribute("data-state", "closed")

    def say(self, text):
        self.page.fill("#chat-input", text)
        self.page.click("#chat-send")  # waits until the button is enabled: connected

    def chat_urls(self):
        return [url for url in self.websockets if "/ws/chat?" in url]

    def assert_clean(self):
        assert not self.dialogs, f"the page opened dialogs: {self.dialogs}"
        assert not self.errors, f"script errors or CSP violations: {self.errors}"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    pages = item.stash.get(PAGES, [])
    if report.when == "call" and report.failed and pages:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid.split("::", 1)[-1])
        saved = []
        for number, demo in enumerate(pages, 1):
            path = ARTIFACTS / f"{stem}-page{number}.png"
            try:
                demo.page.screenshot(path=str(path), full_page=True, timeout=5_000)
                saved.append(str(path))
            except Exception as error:  # a crashed page must not hide the test's own failure
                saved.append(f"{path}: no screenshot ({error})")
        report.sections.append(("browser screenshots", "\n".join(saved)))
    return report
