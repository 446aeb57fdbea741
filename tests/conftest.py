"""Black-box settings: the suite only knows nginx's URL, in the tests container or locally.

STACK_BASE_URL                 nginx, e.g. http://127.0.0.1:8080 or http://nginx:8080
STACK_TLS_BASE_URL             nginx's TLS port, e.g. https://127.0.0.1:8443 or https://nginx:8443
STACK_TLS_CA_FILE              the CA that signed nginx's certificate (the only one the TLS tests trust)
STACK_MODE                     "local" (make test) runs the @pytest.mark.local tests too;
                               "compose" (make test-compose, on the host) the
                               @pytest.mark.compose ones; "container" (the tests container)
                               skips both and runs the @pytest.mark.container ones;
                               "k8s" (make test-k8s, on the host) the @pytest.mark.k8s ones
NGINX_PROXY_READ_TIMEOUT       the stack's setting, so idle tests hold longer than it
UWSGI_WEBSOCKETS_PING_FREQ     the stack's setting
"""
import os
import sys
from pathlib import Path

import pytest

# wsstack (the raw RFC 6455 client, the conformance checks): common/ in the checkout,
# copied to the same place relative to the tests in the tests image.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "common"))

MODE = os.environ.get("STACK_MODE", "local")


def pytest_collection_modifyitems(config, items):
    skip_local = pytest.mark.skip(reason="needs the repository checkout and local tools (STACK_MODE=local)")
    skip_compose = pytest.mark.skip(reason="inspects the podman compose stack (make test-compose, STACK_MODE=compose)")
    skip_container = pytest.mark.skip(reason="inspects the tests container from inside (STACK_MODE=container)")
    skip_k8s = pytest.mark.skip(reason="checks the pods of make test-k8s (STACK_MODE=k8s)")
    for item in items:
        if "local" in item.keywords and MODE != "local":
            item.add_marker(skip_local)
        if "compose" in item.keywords and MODE != "compose":
            item.add_marker(skip_compose)
        if "container" in item.keywords and MODE != "container":
            item.add_marker(skip_container)
        if "k8s" in item.keywords and MODE != "k8s":
            item.add_marker(skip_k8s)


@pytest.fixture(params=["uwsgi", "flask"])
def backend(request):
    """Each backend's path prefix behind nginx."""
    return request.param
