"""The fuzz harness of the patched WebSocket engine (common/uwsgi-fuzz/): it builds, every
committed corpus and regression input replays cleanly, and a bounded coverage-guided run
finds no crash, leak, undefined behaviour or oracle violation."""
import os
import shutil
import subprocess

import pytest

from repo import REPO

pytestmark = pytest.mark.local

RUN = REPO / "common" / "uwsgi-fuzz" / "run.sh"
# short enough for `make test`, long enough to get past the seeds; FUZZ_CI_SECONDS raises it
FUZZ_CI_SECONDS = int(os.environ.get("FUZZ_CI_SECONDS", "60"))


def run(*args, timeout):
    result = subprocess.run([str(RUN), *args], capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def harness():
    status, output = run("build", timeout=600)
    assert status == 0, f"the fuzz harness does not build:\n{output[-4000:]}"


def test_every_committed_input_replays_cleanly(harness):
    status, output = run("replay", timeout=600)
    failures = [line for line in output.splitlines() if line.startswith("uwsgi-fuzz: FAIL") or line.startswith("    ")]
    assert status == 0, "committed fuzz inputs crash the engine (each FAIL names the input):\n" + "\n".join(failures)


def test_bounded_fuzz_run_finds_nothing(harness):
    # starts from the committed seeds alone, as in CI; kept after the test for the inputs
    env_out = REPO / ".run" / "uwsgi-fuzz" / "ci"
    shutil.rmtree(env_out, ignore_errors=True)
    result = subprocess.run(
        [str(RUN), "fuzz", str(FUZZ_CI_SECONDS)], capture_output=True, text=True,
        timeout=FUZZ_CI_SECONDS + 600, env=dict(os.environ, FUZZ_WORK=str(env_out)),
    )
    crashes = sorted(p.name for p in (env_out / "crashes").glob("*")) if (env_out / "crashes").exists() else []
    report = [line for line in result.stderr.splitlines()
              if "ERROR" in line or "runtime error" in line or "==ORACLE==" in line or line.startswith("SUMMARY")]
    assert result.returncode == 0 and not crashes, (
        f"the fuzzer found a problem in {FUZZ_CI_SECONDS} s; input(s) in {env_out / 'crashes'}: {crashes}\n"
        + "\n".join(report[:10]) + "\n" + result.stderr[-3000:])
