"""The demo page in a real browser (headless Chromium, Playwright; local mode).

Echo on both backends, chat between the two backends, user markup shown as text, and a
chat page that survives a restart of its backend: it says "reconnecting", then resumes with
last_id and shows what was said meanwhile, once. A failing test leaves a screenshot of each
of its pages in .run/artifacts/ (named in the report).
"""
import os
import urllib.parse

import pytest

pytest.register_assert_rewrite("browser_support")  # before the import below, which is also the plugin's
from browser_support import expect
from chat_client import ChatClient, new_room
from local_processes import running_nginx, start_app, stop, wait_healthy
from stack import BASE_URL, TLS_BASE_URL

pytest_plugins = ["browser_support"]
pytestmark = pytest.mark.local

MARKUP = "<img src=x onerror=alert(1)>"
OTHER = {"uwsgi": "flask", "flask": "uwsgi"}


@pytest.fixture
def redis_url():
    """The shared stack's Redis: the restarted app and the other backend share the rooms."""
    return f"redis://127.0.0.1:{os.environ.get('LOCAL_REDIS_PORT', '6379')}/0"


def ids(demo):
    return demo.messages.evaluate_all("items => items.map(item => item.dataset.id)")


def test_echo_panel_uses_the_pages_own_host(open_page, backend):
    demo = open_page(BASE_URL + "/")
    demo.choose_backend(backend)
    demo.echo("hello from the browser")
    expect(demo.echo_log.first).to_have_text(f"{backend} ← hello from the browser")
    host = urllib.parse.urlsplit(BASE_URL).netloc
    assert demo.websockets[-1] == f"ws://{host}/{backend}/ws/echo"
    demo.assert_clean()


def test_page_over_https_opens_its_websockets_with_wss(open_page, backend):
    # Chromium does not know the development CA; the Python TLS tests check the certificate.
    demo = open_page(TLS_BASE_URL + "/", ignore_https_errors=True)
    demo.choose_backend(backend)
    demo.echo("hello over https")
    expect(demo.echo_log.first).to_have_text(f"{backend} ← hello over https")
    demo.join(new_room(), "tls-user")
    demo.say("chat over wss")
    expect(demo.texts).to_have_text(["chat over wss"])
    host = urllib.parse.urlsplit(TLS_BASE_URL).netloc
    assert f"wss://{host}/{backend}/ws/echo" in demo.websockets, demo.websockets
    assert demo.chat_urls() and all(url.startswith(f"wss://{host}/{backend}/ws/chat?") for url in demo.chat_urls())
    assert all(url.startswith("wss://") for url in demo.websockets), demo.websockets
    demo.assert_clean()


def test_pages_on_different_backends_chat_in_one_room(open_page):
    room = new_room()
    alice = open_page(BASE_URL + "/")
    alice.choose_backend("uwsgi")
    alice.join(room, "alice")
    bob = open_page(BASE_URL + "/")
    bob.choose_backend("flask")
    bob.join(room, "bob")

    alice.say("hello from uwsgi")
    for demo in (alice, bob):
        expect(demo.texts).to_have_text(["hello from uwsgi"])
    bob.say("hello from flask")
    for demo in (alice, bob):
        expect(demo.texts).to_have_text(["hello from uwsgi", "hello from flask"])
        expect(demo.messages.locator(".user")).to_have_text(["alice", "bob"])
        expect(demo.messages.locator(".via")).to_have_text(["via uwsgi", "via flask"])
    # Same ids, same order, on both pages.
    assert ids(alice) == ids(bob)
    for demo in (alice, bob):
        demo.assert_clean()


def test_markup_in_names_and_messages_is_shown_as_text(open_page, backend):
    demo = open_page(BASE_URL + "/")
    demo.choose_backend(backend)
    demo.join(new_room(), "<i>mallory</i>")
    demo.say(MARKUP)
    expect(demo.texts).to_have_text([MARKUP])
    expect(demo.messages.locator(".user")).to_have_text(["<i>mallory</i>"])
    demo.echo(MARKUP)
    expect(demo.echo_log.first).to_have_text(f"{backend} ← {MARKUP}")
    # Parsed as HTML, the text would have become elements (and the img's onerror an alert).
    assert demo.page.locator("#chat-messages img, #chat-messages i, #echo-log img").count() == 0
    demo.assert_clean()  # no dialog, no script error, no CSP violation


@pytest.mark.parametrize("restarted", ["uwsgi", "flask"])
def test_chat_resumes_after_a_backend_restart_without_gaps_or_duplicates(open_page, tmp_path, redis_url, restarted):
    """The page's backend is an app of the test's own behind an nginx of its own (the shared
    stack must not lose a process); it is stopped and started again on the same port while
    someone on the other backend, in the shared stack, keeps talking."""
    app = f"{restarted}-app"
    settings = {"REDIS_URL": redis_url, "UWSGI_PROCESSES": "1"}
    process, app_url = start_app(app, tmp_path / "app-first.log", **settings)
    try:
        wait_healthy(process, app_url)
        port = urllib.parse.urlsplit(app_url).port
        with running_nginx(tmp_path, **{f"{restarted}_app_upstream": f"127.0.0.1:{port}"}) as nginx_ws:
            room = new_room()
            demo = open_page("http" + nginx_ws.removeprefix("ws") + "/")
            demo.choose_backend(restarted)
            demo.join(room, "carol")
            demo.say("before the restart")
            expect(demo.texts).to_have_text(["before the restart"])
            last_before = ids(demo)[-1]

            stop(process)  # graceful: the page gets close 1001
            expect(demo.chat_state).to_have_attribute("data-state", "reconnecting")
            meanwhile = [f"meanwhile {n}" for n in range(3)]
            with ChatClient(OTHER[restarted], room, "dave") as dave:  # through the shared stack
                for text in meanwhile:
                    dave.say(text)
                said = dave.messages(len(meanwhile))  # stored: the room sent them back
            assert [message["text"] for message in said] == meanwhile
            expect(demo.chat_state).to_have_attribute("data-state", "reconnecting")  # still down

            process, _ = start_app(app, tmp_path / "app-second.log", port=port, **settings)
            wait_healthy(process, app_url)
            expect(demo.texts).to_have_text(["before the restart", *meanwhile], timeout=20_000)
            expect(demo.chat_state).to_have_attribute("data-state", "connected")
            assert ids(demo) == [last_before, *(message["id"] for message in said)]
            chat_urls = demo.chat_urls()
            assert len(chat_urls) >= 2 and "last_id" not in chat_urls[0], chat_urls
            assert urllib.parse.parse_qs(urllib.parse.urlsplit(chat_urls[-1]).query).get("last_id") == [last_before], chat_urls
            # The page's own URLs follow the page's host (this nginx's port), not a fixed one.
            assert all(url.startswith(nginx_ws + f"/{restarted}/ws/chat?") for url in chat_urls)
            demo.assert_clean()
    finally:
        stop(process)
