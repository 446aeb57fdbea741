"""Supply chain: every Python package an image or local mode installs comes from a lock that
`make lock` wrote from its hand-edited .in file (the whole closure, pinned, with hashes), every
install checks the hashes, and the uWSGI sdist is checked against its pinned sha256 before
the patches touch it."""
import gzip
import hashlib
import importlib.metadata
import io
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from repo import DOCKERFILES, REPO, dev_certificate_dir, free_port

pytestmark = pytest.mark.local

# Every lock, by the .in file it is generated from (scripts/lock.sh compiles exactly these).
LOCK_INPUTS = {
    "common/build-requirements.txt": "common/build-requirements.in",
    "scripts/requirements-local.txt": "scripts/requirements-local.in",
    "scripts/requirements-lock.txt": "scripts/requirements-lock.in",
    "uwsgi-app/requirements.txt": "uwsgi-app/requirements.in",
    "flask-app/requirements.txt": "flask-app/requirements.in",
    "tests/requirements.txt": "tests/requirements.in",
    "tests/compose/requirements.txt": "tests/compose/requirements.in",
    "tests/requirements-compose-schema.txt": "tests/requirements-compose-schema.in",
}
# Compiled with scripts/requirements-local.txt as constraints: the versions local mode tests.
CONSTRAINED = ["common/build-requirements.txt", "uwsgi-app/requirements.txt", "flask-app/requirements.txt",
               "tests/requirements.txt", "tests/compose/requirements.txt"]
# Whatever installs Python packages, and so must check their hashes.
INSTALLERS = [*(d for d in DOCKERFILES if d.parent.name != "nginx"), REPO / "scripts" / "bootstrap.sh",
              REPO / "tests" / "compose" / "bootstrap.sh", REPO / "scripts" / "stock-uwsgi.sh",
              REPO / "scripts" / "lock.sh", REPO / "Makefile"]
# The two Pythons the locks must install on: Debian bookworm's (make test-compose's stand-in
# images) and the official image's. scripts/lock.sh resolves for the older one.
TARGET_PYTHONS = ["3.11.2", "3.11.14"]
BUILD_UWSGI = REPO / "common" / "build-uwsgi.sh"


def logical_lines(text):
    """Lines with backslash continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", text)
    return [line for line in (re.sub(r"(^|\s)#.*", "", raw).strip() for raw in text.splitlines()) if line]


def read_lock(path):
    """{canonical name: (version, [sha256], marker or None)} of a lock file."""
    entries = {}
    for line in logical_lines((REPO / path).read_text()):
        requirement, *options = line.split(" --hash=")
        parsed = Requirement(requirement)
        (specifier,) = parsed.specifier
        assert specifier.operator == "==", f"{path}: {line}"
        hashes = [option.strip() for option in options]
        entries[canonicalize_name(parsed.name)] = (specifier.version, hashes, parsed.marker)
    return entries


def read_input(path):
    """The requirements of a .in file, following its -r includes."""
    requirements = []
    for line in logical_lines((REPO / path).read_text()):
        if line.startswith("-r "):
            requirements += read_input((REPO / path).parent.joinpath(line[3:].strip()).resolve().relative_to(REPO))
        else:
            requirements.append(Requirement(line))
    return requirements


def target_environment(python):
    environment = default_environment()
    environment.update(python_full_version=python, python_version=".".join(python.split(".")[:2]),
                       implementation_version=python, sys_platform="linux", platform_system="Linux",
                       platform_machine="x86_64", os_name="posix", implementation_name="cpython",
                       platform_python_implementation="CPython")
    return environment


def closure(requirements, python):
    """Canonical names of everything the requirements pull in on that Python, read from the
    installed packages' metadata (local mode's .venv holds every package of these locks)."""
    environment = target_environment(python)
    found, pending = set(), [(r, frozenset(r.extras)) for r in requirements]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        seen = (name, extras)
        if seen in found:
            continue
        found.add(seen)
        for text in importlib.metadata.distribution(name).requires or []:
            dependency = Requirement(text)
            wanted = not dependency.marker or any(
                dependency.marker.evaluate({**environment, "extra": extra}) for extra in extras | {""})
            if wanted:
                pending.append((dependency, frozenset(dependency.extras)))
    return {name for name, _ in found}


def test_every_lock_is_generated_by_make_lock_and_hashed():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*requirements*"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    # Autobahn|Testsuite's Python 2.7 closure is hash-locked by hand (tests/autobahn/setup.sh).
    assert {f for f in files if f.endswith(".txt")} - {"tests/autobahn/requirements-py27.txt"} == set(LOCK_INPUTS)
    # Every input feeds a lock: its own, or local mode's through an -r include.
    included = {line.split()[1] for line in logical_lines((REPO / "scripts/requirements-local.in").read_text())
                if line.startswith("-r ")}
    assert {f for f in files if f.endswith(".in")} == set(LOCK_INPUTS.values()) | {
        str((REPO / "scripts" / path).resolve().relative_to(REPO)) for path in included}
    lock_script = (REPO / "scripts" / "lock.sh").read_text()
    for lock in LOCK_INPUTS:
        assert (REPO / lock).read_text().startswith(
            "# This file was autogenerated by uv via the following command:\n#    make lock\n"), lock
        assert re.search(rf"\s{re.escape(lock.removesuffix('.txt'))}\b", lock_script), f"make lock skips {lock}"
        for name, (version, hashes, _) in read_lock(lock).items():
            assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{lock}: {name}"


@pytest.mark.parametrize("lock", sorted(LOCK_INPUTS), ids=str)
def test_every_pin_of_the_input_is_locked_at_that_version(lock):
    entries = read_lock(lock)
    for requirement in read_input(LOCK_INPUTS[lock]):
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"{LOCK_INPUTS[lock]}: pin {requirement} with =="
        name = canonicalize_name(requirement.name)
        assert name in entries and entries[name][0] == specifier.version, f"{lock}: {requirement} not locked"


@pytest.mark.parametrize("lock", ["scripts/requirements-local.txt", "common/build-requirements.txt",
                                  "uwsgi-app/requirements.txt", "flask-app/requirements.txt",
                                  "tests/requirements.txt"])
def test_the_lock_is_exactly_the_closure_of_its_input(lock):
    """Nothing missing (pip would refuse the install) and nothing stale (a package no input
    needs any more), on the oldest target Python; on the newer one nothing is missing."""
    inputs = read_input(LOCK_INPUTS[lock])
    locked = set(read_lock(lock))
    assert closure(inputs, TARGET_PYTHONS[0]) == locked
    assert closure(inputs, TARGET_PYTHONS[1]) <= locked


def test_the_python_target_keeps_what_an_older_python_needs():
    # redis needs async-timeout before 3.11.3 only: the lock carries it unconditionally, or
    # the stand-in images' Debian Python 3.11.2 would miss it.
    for lock in ("uwsgi-app/requirements.txt", "flask-app/requirements.txt"):
        version, _, marker = read_lock(lock)["async-timeout"]
        assert marker is None, lock
    assert "async-timeout" in closure([Requirement("redis")], "3.11.2")
    assert "async-timeout" not in closure([Requirement("redis")], "3.11.14")


def test_the_no_deps_locks_hold_one_package_each():
    assert set(read_lock("tests/requirements-compose-schema.txt")) == {"docker-compose"}
    assert set(read_lock("scripts/requirements-lock.txt")) == {"uv"}


@pytest.mark.parametrize("lock", CONSTRAINED, ids=str)
def test_the_image_locks_pin_local_modes_versions(lock):
    local = read_lock("scripts/requirements-local.txt")
    for name, (version, hashes, _) in read_lock(lock).items():
        if name in local:
            assert (version, hashes) == local[name][:2], f"{lock}: {name}"


def test_both_apps_get_pyjwt_with_its_crypto_extra():
    for app in ("uwsgi-app", "flask-app"):
        entries = read_lock(f"{app}/requirements.txt")
        assert entries["pyjwt"][0] == "2.15.1" and "cryptography" in entries, app


def test_the_venv_holds_exactly_what_its_locks_pin():
    """bootstrap.sh recreates .venv whenever a lock changes: nothing unlocked stays behind."""
    pinned = {}
    for lock in ("scripts/requirements-local.txt", "common/build-requirements.txt",
                 "tests/requirements-compose-schema.txt", "tests/compose/requirements.txt"):
        for name, (version, _, _) in read_lock(lock).items():
            pinned.setdefault(name, set()).add(version)
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions(path=[p for p in sys.path if p.startswith(sys.prefix)])}
    assert {name: v for name, v in installed.items() if v not in pinned.get(name, ())} == {}
    local = read_lock("scripts/requirements-local.txt")
    assert {name for name in local if installed.get(name) != local[name][0]} == set()


def pip_commands(path):
    """Every logical line of an installer that runs pip install or pip download."""
    commands = [command.strip() for line in logical_lines(path.read_text()) for command in re.split(r"&&|;", line)]
    return [command for command in commands if re.search(r"pip[\"']?\s+(install|download)\b|pip_install=\(", command)]


@pytest.mark.parametrize("installer", INSTALLERS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_pip_install_checks_hashes(installer):
    commands = pip_commands(installer)
    assert commands, "no pip command found: the pattern no longer matches the installer"
    for command in commands:
        assert "--require-hashes" in command, command
    if installer.suffix != ".sh" and installer.name != "Makefile":
        copied = dict((dst, src) for src, dst in re.findall(r"^COPY (\S+requirements\S*\.txt) (\S+)$",
                                                            installer.read_text(), re.M))
        installed = re.findall(r"-r (\S+)", " ".join(commands))
        assert installed and {copied[path] for path in installed} <= set(LOCK_INPUTS), copied


def test_bootstrap_installs_only_through_the_hash_checking_command():
    text = (REPO / "scripts" / "bootstrap.sh").read_text()
    assert re.search(r'^\s*pip_install=\("\$VENV/bin/pip" install .*--require-hashes\)$', text, re.M)
    assert len(re.findall(r'"\$\{pip_install\[@\]\}"', text)) == 3
    assert not re.search(r"--upgrade pip", text)


def run_build_uwsgi(tmp_path, lock_text, sdist_bytes):
    """build-uwsgi.sh --source-only against one sdist in a find-links folder, with no index."""
    links = tmp_path / "links"
    links.mkdir()
    (links / "uwsgi-2.0.31.tar.gz").write_bytes(sdist_bytes)
    lock = tmp_path / "requirements.txt"
    lock.write_text(lock_text)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links)}
    return subprocess.run([str(BUILD_UWSGI), "--source-only", str(tmp_path / "src"), str(lock),
                           str(Path(sys.executable).parent / "pip")],
                          env=env, capture_output=True, text=True, timeout=120)


def minimal_sdist():
    """A well-formed uWSGI 2.0.31 sdist that is not uWSGI's: metadata, no source."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in {"PKG-INFO": "Metadata-Version: 2.1\nName: uWSGI\nVersion: 2.0.31\n",
                           "setup.py": "from setuptools import setup\nsetup(name='uWSGI', version='2.0.31')\n"}.items():
            data = text.encode()
            info = tarfile.TarInfo(f"uwsgi-2.0.31/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def test_build_uwsgi_refuses_an_sdist_that_is_not_the_locked_one(tmp_path):
    lock = (REPO / "uwsgi-app" / "requirements.txt").read_text()
    pinned = read_lock("uwsgi-app/requirements.txt")["uwsgi"][1]
    result = run_build_uwsgi(tmp_path, lock, minimal_sdist())
    assert result.returncode == 1, result.stderr
    assert "is not the one" in result.stderr and "refusing to build it" in result.stderr, result.stderr
    assert pinned[0].removeprefix("sha256:") in result.stderr
    # Refused before anything was unpacked or patched.
    assert "does not apply" not in result.stderr and not (tmp_path / "src").exists()


def test_build_uwsgi_refuses_a_wrong_pin(tmp_path):
    sdist = minimal_sdist()
    lock = re.sub(r"(uwsgi==2\.0\.31 \\\n\s+--hash=sha256:)[0-9a-f]{64}", r"\g<1>" + "0" * 64,
                  (REPO / "uwsgi-app" / "requirements.txt").read_text())
    assert "0" * 64 in lock
    result = run_build_uwsgi(tmp_path, lock, sdist)
    assert result.returncode == 1 and "refusing to build it" in result.stderr, result.stderr
    assert "0" * 64 in result.stderr and not (tmp_path / "src").exists()


def test_build_uwsgi_passes_the_pinned_sdist_on_to_the_patches(tmp_path):
    # The same stand-in sdist, pinned with its own hash: the check lets it through, and the
    # first patch then fails on its missing source, so the check comes before the patches.
    sdist = minimal_sdist()
    result = run_build_uwsgi(tmp_path, f"uwsgi==2.0.31 \\\n    --hash=sha256:{sha256_of(sdist)}\n", sdist)
    assert result.returncode == 1 and "0001-per-connection-continuation-buffer.patch does not apply" in result.stderr, \
        result.stderr
    assert "refusing" not in result.stderr


def test_build_uwsgi_refuses_a_pin_without_a_hash(tmp_path):
    result = run_build_uwsgi(tmp_path, "uWSGI==2.0.31\n", minimal_sdist())
    assert result.returncode == 1 and "without a sha256" in result.stderr, result.stderr


# --- base images by digest (scripts/pin-images.sh, make pin-images) ---------------------------
IMAGE_VARIABLES = ["PYTHON_IMAGE", "NGINX_IMAGE", "REDIS_IMAGE"]
REFERENCE = r"[a-z0-9./:-]+:\d+\.\d+\.\d+[\w.-]*(?:@sha256:[0-9a-f]{64})?"


def image_defaults(root):
    """{variable: every default the tree at root writes for it}: compose, Dockerfiles, docs,
    and for Redis what kustomize renders into the Deployment."""
    found = {variable: set() for variable in IMAGE_VARIABLES}
    compose_text = (root / "docker-compose.yml").read_text()
    for variable in IMAGE_VARIABLES:
        found[variable] |= set(re.findall(rf"\$\{{{variable}:-([^}}]*)\}}", compose_text))
        for dockerfile in root.glob("*/Dockerfile"):
            found[variable] |= set(re.findall(rf"^ARG {variable}=(\S+)$", dockerfile.read_text(), re.M))
        found[variable] |= set(re.findall(rf"^\| `{variable}` \| `([^`]+)` \|", (root / "docs/configuration.md").read_text(), re.M))
    rendered = subprocess.run([str(Path(sys.executable).parent / "kubectl"), "kustomize", str(root / "k8s" / "base")],
                              capture_output=True, text=True, check=True).stdout
    found["REDIS_IMAGE"] |= set(re.findall(r"^\s+image: (redis\S*)$", rendered, re.M))
    return found


def test_each_base_image_has_one_reference_everywhere():
    for variable, references in image_defaults(REPO).items():
        assert len(references) == 1, (variable, references)
        assert re.fullmatch(REFERENCE, next(iter(references))), references


def pin_tree(tmp_path):
    """The files pin-images.sh edits, with the script itself, copied into tmp_path."""
    files = ["docker-compose.yml", "docs/configuration.md", "scripts/pin-images.sh",
             *(str(p.relative_to(REPO)) for p in REPO.glob("*/Dockerfile")),
             *(str(p.relative_to(REPO)) for p in (REPO / "k8s").rglob("*") if p.is_file())]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


def pin_images(root, *arguments, env=None):
    return subprocess.run([str(root / "scripts" / "pin-images.sh"), *arguments], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def untagged(reference):
    return reference.split("@")[0]


def test_pin_images_writes_given_digests_everywhere_and_replaces_them(tmp_path):
    root = pin_tree(tmp_path)
    before = {v: untagged(next(iter(r))) for v, r in image_defaults(root).items()}
    first = {v: f"{before[v]}@sha256:{str(i) * 64}" for i, v in enumerate(IMAGE_VARIABLES, 1)}
    result = pin_images(root, *(f"{v}={r}" for v, r in first.items()))
    assert result.returncode == 0, result.stderr
    assert image_defaults(root) == {v: {r} for v, r in first.items()}
    # Again with another digest: replaced, not added.
    again = f"{before['REDIS_IMAGE']}@sha256:{'e' * 64}"
    assert pin_images(root, f"REDIS_IMAGE={again}").returncode == 0
    assert image_defaults(root)["REDIS_IMAGE"] == {again}
    assert image_defaults(root)["PYTHON_IMAGE"] == {first["PYTHON_IMAGE"]}


def test_pin_images_refuses_a_digest_for_another_tag_or_a_malformed_one(tmp_path):
    root = pin_tree(tmp_path)
    result = pin_images(root, f"REDIS_IMAGE=redis:0.0.1@sha256:{'a' * 64}")
    assert result.returncode == 1 and "change the tag first" in result.stderr, result.stderr
    result = pin_images(root, "REDIS_IMAGE=redis:7.4.8@sha256:abc")
    assert result.returncode == 2 and "expected VAR=" in result.stderr
    assert (root / "docker-compose.yml").read_text() == (REPO / "docker-compose.yml").read_text()


def oci_layout(directory, marker):
    """A one-layer OCI image layout, distinct per marker; returns the manifest's digest."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data):
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    layer_tar = io.BytesIO()
    with tarfile.open(fileobj=layer_tar, mode="w") as tar:
        info = tarfile.TarInfo("marker")
        info.size = len(marker.encode())
        tar.addfile(info, io.BytesIO(marker.encode()))
    layer_digest, layer_size = blob(gzip.compress(layer_tar.getvalue(), mtime=0))
    config_digest, config_size = blob(json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar.getvalue()).hexdigest()]},
    }).encode())
    manifest_digest, manifest_size = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": layer_size}],
    }).encode())
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size}]}))
    return manifest_digest


@pytest.fixture
def loopback_registry(tmp_path):
    """A Docker registry (Debian's docker-registry) on 127.0.0.1, with TLS from the tests'
    development CA, standing in for Docker Hub."""
    port = free_port()
    tls = dev_certificate_dir()
    config = tmp_path / "registry.yml"
    config.write_text(json.dumps({
        "version": 0.1, "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
        "http": {"addr": f"127.0.0.1:{port}",
                 "tls": {"certificate": str(tls / "server.crt"), "key": str(tls / "server.key")}},
    }))
    process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", timeout=2, context=context).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the registry did not start"
                time.sleep(0.2)
        yield f"127.0.0.1:{port}", context, {"SSL_CERT_FILE": str(tls / "ca.crt")}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_pin_images_asks_the_registry_for_each_tags_digest(tmp_path, loopback_registry):
    registry, context, env = loopback_registry
    root = pin_tree(tmp_path / "tree")
    served = {}
    for variable, references in image_defaults(root).items():
        name, tag = untagged(next(iter(references))).rsplit(":", 1)
        layout = tmp_path / "layouts" / variable
        oci_layout(layout, variable)
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{layout}", f"docker://{registry}/library/{name}:{tag}"],
                       env={**os.environ, **env}, check=True, capture_output=True, timeout=60)
        # What the registry itself says the tag's manifest is, not what the script computes.
        request = urllib.request.Request(f"https://{registry}/v2/library/{name}/manifests/{tag}", method="HEAD",
                                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            served[variable] = f"{name}:{tag}@{response.headers['Docker-Content-Digest']}"
    assert len(set(served.values())) == 3
    result = pin_images(root, env={**env, "PIN_IMAGES_REGISTRY": registry})
    assert result.returncode == 0, result.stderr
    assert image_defaults(root) == {v: {r} for v, r in served.items()}
