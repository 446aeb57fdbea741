"""Black-box settings: the suite only knows nginx's URL, in the tests container or locally.

STACK_BASE_URL                 nginx, e.g. http://127.0.0.1:8080 or http://nginx:8080
STACK_MODE                     "local" (make test) runs the @pytest.mark.local tests too;
                               anything else (the tests container) skips them
NGINX_PROXY_READ_TIMEOUT       the stack's setting, so idle tests hold longer than it
UWSGI_WEBSOCKETS_PING_FREQ     the stack's setting
"""
import os

import pytest

MODE = os.environ.get("STACK_MODE", "local")


def pytest_collection_modifyitems(config, items):
    if MODE == "local":
        return
    skip = pytest.mark.skip(reason="needs the repository checkout and local tools (STACK_MODE=local)")
    for item in items:
        if "local" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["uwsgi", "flask"])
def backend(request):
    """Each backend's path prefix behind nginx."""
    return request.param
