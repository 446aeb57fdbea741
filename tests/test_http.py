"""Plain HTTP through nginx: health, the demo page, and WebSocket endpoints hit without an upgrade."""
import json

from stack import http_get


def test_stack_health_reports_both_apps():
    resp = http_get("/healthz")
    assert resp.status == 200
    assert json.loads(resp.body) == {"status": "ok", "apps": ["uwsgi-app", "flask-app"]}
    assert resp.headers["cache-control"] == "no-store"


def test_app_health_through_nginx(backend):
    resp = http_get(f"/{backend}/healthz")
    assert resp.status == 200
    health = json.loads(resp.body)
    assert health["status"] == "ok"
    assert health["app"] == f"{backend}-app"
    # Redis is reported, never required for the app to be healthy.
    assert health["redis"] == "ok" or health["redis"].startswith("unavailable")


def test_plain_get_on_websocket_endpoint_asks_for_an_upgrade(backend):
    resp = http_get(f"/{backend}/ws/echo")
    assert resp.status == 426
    assert resp.headers["upgrade"].lower() == "websocket"
    assert b"WebSocket" in resp.body


def test_upgrade_without_key_is_a_bad_request(backend):
    resp = http_get(f"/{backend}/ws/echo", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert resp.status == 400
    assert b"Sec-WebSocket-Key" in resp.body


def test_unknown_app_path_is_404_not_5xx(backend):
    assert http_get(f"/{backend}/no-such-thing").status == 404


def test_demo_page_is_served_with_a_content_security_policy():
    resp = http_get("/")
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in resp.headers["content-security-policy"]
    assert b"<script" in resp.body


def test_server_header_hides_the_nginx_version():
    assert http_get("/healthz").headers["server"] == "nginx"
