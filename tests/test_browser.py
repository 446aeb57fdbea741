"""The demo page in a real browser (headless Chromium, Playwright; local mode).

Echo on both backends; chat: sign-in (a token from /auth/token, kept for every tab of the
browser, renewed before it expires and after a 4001), chat between the two backends,
presence across them (join shows up, leave disappears, two tabs are one member), user markup
shown as text, a notice when a resume was incomplete, and a page that survives a restart of
its backend: it says "reconnecting", then resumes with last_id and epoch and shows what was
said meanwhile, once. A failing test leaves a screenshot of each of its pages in
.run/artifacts/ (named in the report).
"""
import os
import time
import urllib.parse

import pytest

pytest.register_assert_rewrite("browser_support")  # before the import below, which is also the plugin's
from browser_support import expect
from chat_client import ChatClient, new_room, token
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


def redis_client(url):
    """The stack's Redis as its admin user (the default user may run nothing)."""
    from local_redis import admin_client

    return admin_client(int(url.rsplit(":", 1)[1].split("/")[0]))


def ids(demo):
    return demo.messages.evaluate_all("items => items.map(item => item.dataset.id)")


def mine(demo):
    return demo.messages.evaluate_all("items => items.map(item => item.classList.contains('mine'))")


def query(url):
    return urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)


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


def test_sign_in_keeps_one_token_for_every_tab_of_the_browser(open_page):
    demo = open_page(BASE_URL + "/")
    assert demo.identity() is None
    expect(demo.page.locator("#chat-join-button")).to_be_disabled()  # no room before a name
    demo.sign_in("ada")
    identity = demo.identity()
    assert identity["user"]["name"] == "ada" and identity["user"]["id"].startswith("u-"), identity
    assert identity["expires_at"] > time.time() + 60 and identity["token"].count(".") == 2, identity
    room = new_room()
    demo.join(room)
    # The name comes from the token, which travels in Sec-WebSocket-Protocol, never in the URL.
    assert demo.chat_urls() and all(set(query(url)) == {"room"} for url in demo.chat_urls()), demo.chat_urls()
    assert identity["token"] not in " ".join(demo.websockets)

    tab = open_page(BASE_URL + "/", tab_of=demo)  # already signed in: same storage
    expect(tab.page.locator("#chat-me")).to_have_text("Signed in as ada")
    assert tab.identity() == identity
    tab.join(room)
    demo.say("from the first tab")
    tab.say("from the second tab")
    for page in (demo, tab):
        expect(page.texts).to_have_text(["from the first tab", "from the second tab"])
        assert mine(page) == [True, True]  # one user id: both are "mine" on both tabs
        expect(page.members).to_have_text(["ada"])  # two tabs, one member
        expect(page.member_count).to_have_text("1 in the room")

    tab.page.click("#chat-signin-button")  # sign out: every tab follows
    expect(tab.chat_state).to_have_attribute("data-state", "closed")
    for page in (demo, tab):
        expect(page.page.locator("#chat-name")).to_be_visible()
        assert page.identity() is None
    expect(demo.chat_state).to_have_attribute("data-state", "closed")
    for page in (demo, tab):
        page.assert_clean()


def test_presence_follows_joins_and_leaves_across_backends(open_page):
    room = new_room()
    alice = open_page(BASE_URL + "/")
    alice.choose_backend("uwsgi")
    alice.join(room, "alice")
    expect(alice.members).to_have_text(["alice"])
    expect(alice.members.first).to_have_class("member me")

    bob = open_page(BASE_URL + "/")
    bob.choose_backend("flask")
    bob.join(room, "bob")
    for demo, me in ((alice, "alice"), (bob, "bob")):
        expect(demo.members).to_have_text(["alice", "bob"])  # sorted by name
        expect(demo.member_count).to_have_text("2 in the room")
        expect(demo.page.locator("#chat-members li.me")).to_have_text([me])

    with ChatClient("uwsgi", room, "carol") as carol:  # not a page: the presence is the server's
        assert {member["name"] for member in carol.presence["members"]} == {"alice", "bob", "carol"}
        for demo in (alice, bob):
            expect(demo.members).to_have_text(["alice", "bob", "carol"])
            expect(demo.member_count).to_have_text("3 in the room")
    for demo in (alice, bob):
        expect(demo.members).to_have_text(["alice", "bob"])

    bob.leave()
    expect(bob.page.locator("#chat-presence")).to_be_hidden()
    expect(alice.members).to_have_text(["alice"])
    expect(alice.member_count).to_have_text("1 in the room")
    for demo in (alice, bob):
        demo.assert_clean()


def test_mine_is_the_senders_user_id_not_its_name(open_page):
    room = new_room()
    first = open_page(BASE_URL + "/")
    first.join(room, "sam")
    second = open_page(BASE_URL + "/")  # another browser, the same display name
    second.choose_backend("flask")
    second.join(room, "sam")
    first.say("first sam")
    second.say("second sam")
    for demo in (first, second):
        expect(demo.texts).to_have_text(["first sam", "second sam"])
        expect(demo.members).to_have_text(["sam", "sam"])  # two users, two members
    assert mine(first) == [True, False]
    assert mine(second) == [False, True]


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
    assert mine(alice) == [True, False] and mine(bob) == [False, True]
    for demo in (alice, bob):
        demo.assert_clean()


def test_markup_in_names_and_messages_is_shown_as_text(open_page, backend):
    demo = open_page(BASE_URL + "/")
    demo.choose_backend(backend)
    demo.join(new_room(), "<i>mallory</i>")
    demo.say(MARKUP)
    expect(demo.texts).to_have_text([MARKUP])
    expect(demo.messages.locator(".user")).to_have_text(["<i>mallory</i>"])
    expect(demo.members).to_have_text(["<i>mallory</i>"])
    expect(demo.page.locator("#chat-me")).to_have_text("Signed in as <i>mallory</i>")
    demo.echo(MARKUP)
    expect(demo.echo_log.first).to_have_text(f"{backend} ← {MARKUP}")
    # Parsed as HTML, the text would have become elements (and the img's onerror an alert).
    assert demo.page.locator("#chat-messages img, #chat-messages i, #chat-members i, #chat-me i, #echo-log img").count() == 0
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
            resumed = query(chat_urls[-1])
            assert resumed.get("last_id") == [last_before], chat_urls
            # ...with the epoch that last_id came from: the room's, which nothing replaced.
            epoch = redis_client(redis_url).get(f"chat:{room}:epoch")
            assert epoch is not None and resumed.get("epoch") == [epoch.decode()], (chat_urls, epoch)
            expect(demo.recovery).to_be_hidden()
            # The page's own URLs follow the page's host (this nginx's port), not a fixed one.
            assert all(url.startswith(nginx_ws + f"/{restarted}/ws/chat?") for url in chat_urls)
            demo.assert_clean()
    finally:
        stop(process)


class ChatAway:
    """Takes a page's chat connections away and gives them back, as a network outage would:
    a route over the page's WebSockets to /ws/chat that forwards them to nginx, or, while
    the page is away, closes them at once (1001, as a stopping server does)."""

    def __init__(self, demo):
        self.demo, self.away, self.routes = demo, False, []
        demo.page.route_web_socket("**/ws/chat?*", self._route)

    def _route(self, route):
        self.routes.append(route)
        if self.away:
            route.close(code=1001, reason="test: away")
        else:
            route.connect_to_server()

    def leave(self):
        self.away = True
        self.routes[-1].close(code=1001, reason="test: away")
        expect(self.demo.chat_state).to_have_attribute("data-state", "reconnecting")

    def come_back(self):
        self.away = False
        # The browser going back online: the page retries at once rather than at the end of
        # its backoff.
        context = self.demo.page.context
        context.set_offline(True)
        context.set_offline(False)
        expect(self.demo.chat_state).to_have_attribute("data-state", "connected")


@pytest.mark.parametrize("loss", ["trimmed", "recreated"])
def test_incomplete_recovery_shows_a_notice(open_page, redis_url, loss):
    """While the page is away the room loses what the page would resume from: the stream is
    trimmed past the page's last message, or deleted with its epoch (as a Redis restart without
    persistence loses it). The page resumes, shows what there is, and says that it is not all."""
    room = new_room()
    demo = open_page(BASE_URL + "/")
    away = ChatAway(demo)
    demo.join(room, "erin")
    demo.say("before")
    expect(demo.texts).to_have_text(["before"])
    expect(demo.recovery).to_be_hidden()

    away.leave()
    store = redis_client(redis_url)
    if loss == "recreated":
        store.delete(f"chat:{room}", f"chat:{room}:epoch")
    with ChatClient("flask", room, "frank") as frank:
        for text in ("lost", "kept 1", "kept 2"):
            frank.say(text)
        said = frank.messages(3)
    if loss == "trimmed":
        store.xtrim(f"chat:{room}", minid=said[1]["id"], approximate=False)  # "before" and "lost" go
    else:
        store.xdel(f"chat:{room}", said[0]["id"])  # the recreated stream lost one more
    away.come_back()

    expect(demo.recovery).to_be_visible()
    expect(demo.recovery).to_contain_text("ome messages could not be recovered")
    expect(demo.texts).to_have_text(["before", "kept 1", "kept 2"])
    resumed = query(demo.chat_urls()[-1])
    assert resumed["last_id"] == [ids(demo)[0]] and "epoch" in resumed, demo.chat_urls()

    # A complete resume says nothing new; the notice stays until the next join.
    away.leave()
    away.come_back()
    expect(demo.texts).to_have_text(["before", "kept 1", "kept 2"])
    demo.leave()
    demo.page.click("#chat-join-button")
    expect(demo.chat_state).to_have_attribute("data-state", "connected")
    expect(demo.recovery).to_be_hidden()
    demo.assert_clean()


def test_token_is_renewed_before_it_expires_and_after_a_4001(open_page):
    """A short token in the page's storage: the page renews it (same user id) shortly before
    it expires; the server closes the connection opened with the old one with 4001 when it
    expires, and the page reconnects at once with the new one, resuming with last_id."""
    demo = open_page(BASE_URL + "/")
    short = token("gus", ttl=20)
    demo.page.evaluate("value => localStorage.setItem('wsstack.chat.identity', JSON.stringify(value))", short)
    demo.page.reload()
    expect(demo.page.locator("#chat-me")).to_have_text("Signed in as gus")
    demo.join(new_room())
    demo.say("with the first token")
    expect(demo.texts).to_have_text(["with the first token"])

    # Renewed with the Authorization header: the same user, a later expiry.
    renewed = demo.page.wait_for_function(
        "token => { const v = JSON.parse(localStorage.getItem('wsstack.chat.identity'));"
        " return v && v.token !== token && v; }", arg=short["token"], timeout=25_000).json_value()
    assert renewed["user"] == short["user"] and renewed["expires_at"] > short["expires_at"], renewed
    # The connection still holds the first token; its expiry closes it (4001), and the page
    # is back with the new token, from where it was.
    # (valid until exp + CHAT_AUTH_LEEWAY, as at the handshake)
    leeway = int(os.environ.get("CHAT_AUTH_LEEWAY", "10"))
    demo.page.wait_for_function(f"() => Date.now() / 1000 > {short['expires_at'] + leeway + 1}", timeout=40_000)
    deadline = time.monotonic() + 10
    while len(demo.chat_urls()) < 2 and time.monotonic() < deadline:
        demo.page.wait_for_timeout(100)
    expect(demo.chat_state).to_have_attribute("data-state", "connected")
    chat_urls = demo.chat_urls()
    assert len(chat_urls) >= 2 and query(chat_urls[-1])["last_id"] == ids(demo), chat_urls
    demo.say("with the renewed token")
    expect(demo.texts).to_have_text(["with the first token", "with the renewed token"])
    assert mine(demo) == [True, True]
    demo.assert_clean()


def test_reconnect_delays_are_full_jitter_starting_with_the_servers_window(open_page):
    """Math.random fixed at 0.5: with full jitter each delay is half its ceiling (with equal
    jitter it would be three quarters). The first retry after a 1001 spreads over the window
    history_end announced; the next ones over 0.5 s doubling (1 s, 2 s, 4 s: half of each)."""
    window_ms = int(os.environ.get("CHAT_RECONNECT_WINDOW_MS", "5000"))
    demo = open_page(BASE_URL + "/")
    # Every text the notice shows, even for a moment (a 0.5 s delay is shorter than
    # Playwright's polling of a locator).
    demo.page.add_init_script("""
        Math.random = () => 0.5;
        window.noticesSeen = [];
        document.addEventListener("DOMContentLoaded", () => {
          const notice = document.getElementById("chat-notice");
          new MutationObserver(() => window.noticesSeen.push(notice.textContent))
            .observe(notice, { childList: true, characterData: true, subtree: true });
        });
    """)
    demo.page.reload()
    away = ChatAway(demo)
    demo.join(new_room(), "hal")
    away.leave()
    retries = demo.page.wait_for_function(
        "() => { const r = window.noticesSeen.filter(t => t.includes('retrying in')); return r.length >= 4 && r; }",
        timeout=20_000).json_value()
    reason = "connection lost (1001 test: away)"
    assert retries[:4] == [f"{reason}; retrying in {seconds:.1f} s" for seconds in
                           (window_ms / 2000, 0.5, 1.0, 2.0)], retries
    away.come_back()
    demo.assert_clean()
