"""`make bench --quick`: the benchmark runs end to end and writes well-formed results (local mode).

No timing is asserted here: the numbers belong to `make bench`, on a quiet machine.
"""
import json
import subprocess
import sys

import pytest

from repo import REPO, run_python

pytestmark = pytest.mark.local

APPS = ("uwsgi-app", "flask-app")
# Spelled out here, not read from bench.py: a peer dropped there must fail these tests.
PEERS = ("picows", "aiohttp", "uvicorn", "websockets")
TARGETS = {f"{server} {how}" for server in APPS + PEERS for how in ("direct", "via nginx")}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_every_workload_reports_for_every_target(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    cells = {(c, s) for c in settings["connections"] for s in settings["sizes"]}
    assert {(r["target"], r["connections"], r["size"]) for r in results["echo"]} == {
        (t, c, s) for t in TARGETS for c, s in cells}
    for row in results["echo"]:
        assert row["messages_per_second"] > 0 and row["min"] <= row["messages_per_second"] <= row["max"]
        assert 0 < row["p50_us"] <= row["p99_us"] <= row["p999_us"]
        assert row["dropped"] == 0
    idle = results["idle"]
    assert idle["connections"] == settings["idle"] and idle["dropped"] == 0
    assert set(idle["processes"]) == {"nginx", "uwsgi-app", "flask-app", "redis"}
    assert all(p["rss_bytes_held"] > 0 for p in idle["processes"].values())
    assert [s["connections"] for s in idle["steps"]][-1] == settings["idle"]
    fanout = results["fanout"]
    assert fanout["subscribers_ready"] == settings["fanout"]
    assert fanout["deliveries"] == fanout["expected"] == settings["fanout"] * settings["fanout_messages"]
    assert all(r["handshakes_per_second"] > 0 and r["failed"] == 0 for r in results["handshakes"].values())
    assert {"python", "cpus", "nginx", "uwsgi", "redis"} <= set(results["versions"])


def test_every_peer_runs_at_its_defaults_and_holds_idle_connections(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["peers"]) == list(PEERS)
    for name, peer in results["peers"].items():
        assert peer["peer"] == name and peer["version"] and peer["settings"]
        assert peer["listening"].startswith("127.0.0.1:")
        # Its nginx must not close what does not ping (picows, aiohttp) before the hold ends,
        # its four opening steps included: the hold's memory would be read after the closes.
        assert peer["nginx_proxy_read_timeout_seconds"] > results["settings"]["idle_seconds"] + 4 + 10
    # the libraries' own defaults: two ping, two do not
    assert {name: peer["ping_interval"] for name, peer in results["peers"].items()} == {
        "picows": None, "aiohttp": None, "uvicorn": 20, "websockets": 20}
    # uvicorn[standard]: uvloop, httptools and the websockets library are what "auto" picked
    uvicorn = results["peers"]["uvicorn"]
    assert uvicorn["loop"] == "uvloop" and "httptools" in uvicorn["settings"]["http"]
    assert "websockets" in uvicorn["settings"]["ws"]
    idle = results["idle"]
    assert list(idle["peers"]) == list(PEERS)
    for row in idle["peers"].values():
        assert row["connections"] == results["settings"]["idle"] // 2 and row["dropped"] == 0
        assert row["rss_bytes_held"] > row["rss_bytes_before"] > 0
        assert row["nginx"]["rss_bytes_held"] > row["nginx"]["rss_bytes_before"]
        assert row["pings"] == 0  # a quick run is shorter than any ping interval
        assert row["cpu_us_per_connection_per_ping"] is None


def test_the_report_shows_every_peer_and_each_apps_ratio_to_the_best_one(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    markdown = (out / "results.md").read_text()
    sizes = results["settings"]["sizes"]
    figures = [f for size in sizes for f in (f"echo msg/s, 50 x {size} B via nginx", f"echo p99 us, 50 x {size} B via nginx")]
    figures += ["memory per idle connection, KiB", "idle CPU per connection per ping, us"]
    ratios = {row["figure"]: row for row in results["peer_ratios"]}
    assert list(ratios) == figures
    for figure in figures[:-1]:  # measured in a quick run: every peer, a best one, both apps' ratios
        row = ratios[figure]
        assert set(row["peers"]) == set(PEERS) and all(v is not None for v in row["peers"].values())
        pick = max if row["better"] == "higher" else min
        assert row["best"] == pick(row["peers"].values()) and row["peers"][row["best_peer"]] == row["best"]
        for app in APPS:
            value = row["apps"][app]
            assert value["ratio"] == value["value"] / row["best"]
        assert f"| {figure} | {row['best_peer']} |" in markdown
    # no whole ping interval in a quick run: the row is there, n/a
    assert ratios[figures[-1]]["best_peer"] is None and f"| {figures[-1]} | n/a |" in markdown
    for peer in PEERS:
        assert f"| {peer} | {results['peers'][peer]['version']} |" in markdown  # the peers table
        assert f"| {peer} | {results['settings']['idle'] // 2} |" in markdown  # the idle table
        for how in ("direct", "via nginx"):
            assert f"| {peer} {how} | 50 |" in markdown  # the echo table


def test_the_resume_workload_resumes_a_full_room_on_each_app(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert set(results["resume"]) == {"uwsgi-app", "flask-app"}
    for row in results["resume"].values():
        assert row["clients"] == results["settings"]["resume"] and row["all_history_end"]
        # every client is sent the capped resume, and told that it is not the whole stream
        assert row["messages_min"] == row["messages_max"] == row["messages_expected"]
        assert row["recovered_false"] == row["clients"]
        assert 0 < row["rss_bytes_before"] <= row["rss_bytes_peak"] and row["rss_curve"]


def test_the_reconnect_workload_checks_every_message_across_a_rolling_restart(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert list(results["reconnect"]) == settings["reconnect_apps"]
    for windows in results["reconnect"].values():
        assert [int(w) for w in windows] == settings["reconnect_windows"]
        for row in windows.values():
            assert [step["replica"] for step in row["timeline"]] == list(range(1, settings["reconnect_replicas"] + 1))
            assert all(step["healthy_at"] is not None for step in row["timeline"])
            # every client was on a stopped replica at least once, and every one came back
            assert row["all_resumed"] and row["not_resumed"] == row["never_connected"] == 0
            assert row["closes_1001"] >= row["clients"] and row["resumes"] >= row["closes_1001"]
            assert row["lost"] == row["duplicated"] == row["unexpected"] == row["out_of_order"] == 0
            assert row["messages_in_stream"] > 20 and row["peak_handshakes_per_second"] > 0
            assert sum(row["handshake_bins"]) > 0


def test_the_targets_are_computed_and_reported(quick_run):
    out, stdout = quick_run
    results = json.loads((out / "results.json").read_text())
    assert [t["id"] for t in results["targets"]] == ["P1", "P2", "P3", "P4a", "P4b", "P4c", "P5", "P6"]
    for target in results["targets"]:
        assert isinstance(target["measured"], (int, float)) and target["met"] in (True, False)
    markdown = (out / "results.md").read_text()
    assert markdown in stdout  # printed as well as written
    for target in results["targets"]:
        assert f"| {target['id']} |" in markdown


@pytest.mark.parametrize("plot", ["throughput.png", "latency.png", "memory.png", "resume.png", "reconnect.png"])
def test_plots_are_written(quick_run, plot):
    out, _ = quick_run
    data = (out / plot).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_the_benchmark_refuses_more_idle_connections_than_one_process_can_open():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--idle", "30000"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "would exceed the 20000 open files" in result.stderr


def test_the_bench_never_hands_out_a_port_twice_in_one_run():
    # The bench picks a port long before the process that binds it starts; in between, a second
    # pick must not return it (a replica's metrics server once took the nginx port, and the bench
    # read a 404 from it). 500 picks repeat a port almost surely when the kernel alone decides.
    result = run_python("import bench; ports = [bench.free_port() for _ in range(500)];"
                        "print(len(ports), len(set(ports)))", "bench", "scripts")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["500", "500"]


def test_idle_cpu_per_ping_divides_by_the_pings_that_arrived():
    # The idle listeners count the pings they answer: a server that skipped half of its pings
    # (flask-app's ping sweep once did, for every second but the one it had just swept) must
    # not read twice as cheap per ping.
    result = run_python(
        "import bench\n"
        "held = {'before': {'app': (0.0, 0)}, 'start': {'app': (10.0, 0)}, 'end': {'app': (11.0, 0)},\n"
        "        'elapsed': 40.0, 'pings': {'ws://a': {'total': 100, 'fewest': 0, 'most': 2}}}\n"
        "row = bench.idle_figures(held, 'app', 100, 2, ['ws://a'])\n"
        "print(round(row['cpu_us_per_connection_per_ping']), row['pings_expected'], row['pings_received'],\n"
        "      row['fewest_pings_per_connection'])", "bench", "scripts")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["10000", "200", "100", "0"]
