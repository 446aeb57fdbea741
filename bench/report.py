"""The benchmark's outputs: target ratios (P1-P5), a Markdown report, PNG plots."""
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1024 * 1024


def echo_row(results, target, cell):
    connections, size = cell
    for row in results.get("echo", []):
        if (row["target"], row["connections"], row["size"]) == (target, connections, size):
            return row
    return None


def echo_rate(results, target, cell):
    row = echo_row(results, target, cell)
    return row and row["messages_per_second"]


def echo_p99(results, target, cell):
    row = echo_row(results, target, cell)
    return row and row["p99_us"]


def idle_figure(results, server, key):
    """An idle figure of an app (the stack's processes) or a peer (its own run), or None."""
    idle = results.get("idle")
    if not idle:
        return None
    row = idle["processes"].get(server) or idle["peers"].get(server)
    return row and row[key]


def peer_ratios(results, connections, apps, peers):
    """For each figure: the best peer and each app's ratio to it (app / best peer). Echo at
    `connections` x every size of the run, via nginx; idle memory and CPU per ping (of the
    peers that ping: one that sends none has no such cost to compare)."""
    figures = []
    for size in results["settings"]["sizes"]:
        cell = (connections, size)
        figures.append((f"echo msg/s, {connections} x {size} B via nginx", "higher",
                        lambda t, cell=cell: echo_rate(results, f"{t} via nginx", cell)))
        figures.append((f"echo p99 us, {connections} x {size} B via nginx", "lower",
                        lambda t, cell=cell: echo_p99(results, f"{t} via nginx", cell)))
    figures.append(("memory per idle connection, KiB", "lower",
                    lambda t: idle_figure(results, t, "kib_per_connection")))
    figures.append(("idle CPU per connection per ping, us", "lower",
                    lambda t: idle_figure(results, t, "cpu_us_per_connection_per_ping")))
    rows = []
    for figure, better, value in figures:
        measured = {peer: value(peer) for peer in peers}
        candidates = {peer: v for peer, v in measured.items() if v is not None}
        pick = max if better == "higher" else min
        best = pick(candidates, key=candidates.get) if candidates else None
        rows.append({"figure": figure, "better": better, "best_peer": best,
                     "best": candidates.get(best), "peers": measured,
                     "apps": {app: {"value": value(app), "ratio": ratio(value(app), candidates.get(best))}
                              for app in apps}})
    return rows


def ratio(numerator, denominator):
    return None if not numerator or not denominator else numerator / denominator


def targets(results, cell):
    """[{id, what, measured, target, met}] for the targets P1-P5 (docs/benchmark.md)."""
    rate = lambda target: echo_rate(results, target, cell)  # noqa: E731
    where = f"{cell[0]} connections x {cell[1]} B"
    idle = results.get("idle")  # a workload left out (--only) leaves its targets n/a
    app_cpu = worst_kib = fanout_p99 = None
    if idle:
        processes = idle["processes"]
        app_cpu = sum(processes[app]["cpu_percent_of_one_core"] for app in ("uwsgi-app", "flask-app"))
        worst_kib = max(processes[app]["kib_per_connection"] for app in ("uwsgi-app", "flask-app"))
    if results.get("fanout"):
        fanout_p99 = results["fanout"]["p99_us"]
    runs = [run for windows in results.get("reconnect", {}).values() for run in windows.values()]
    wrong = sum(run["lost"] + run["duplicated"] for run in runs) if runs else None
    rows = [
        ("P1", f"nginx overhead: uwsgi-app via nginx / direct, {where}",
         ratio(rate("uwsgi-app via nginx"), rate("uwsgi-app direct")), ">= 0.60", lambda v: v >= 0.60),
        ("P2", f"flask-app / uwsgi-app, both via nginx, {where}",
         ratio(rate("flask-app via nginx"), rate("uwsgi-app via nginx")), ">= 0.80", lambda v: v >= 0.80),
        ("P3", f"uwsgi-app / picows (the reference peer), both via nginx, {where}",
         ratio(rate("uwsgi-app via nginx"), rate("picows via nginx")), ">= 0.90", lambda v: v >= 0.90),
        ("P4a", f"{idle['connections'] if idle else 'n/a'} idle connections: CPU of both apps, % of one core",
         app_cpu, "< 1", lambda v: v < 1),
        ("P4b", "idle: memory per connection, worst app, KiB", worst_kib, "<= 20", lambda v: v <= 20),
        ("P4c", "idle: connections dropped", idle["dropped"] if idle else None, "0", lambda v: v == 0),
        ("P5", f"chat fan-out to {results['fanout']['subscribers'] if results.get('fanout') else 'n/a'} "
         "subscribers: p99 delivery, ms", None if fanout_p99 is None else fanout_p99 / 1000, "< 100", lambda v: v < 100),
        ("P6", f"chat across a rolling restart ({runs[0]['clients'] if runs else 'n/a'} clients, both apps, every "
         "reconnect window): messages lost + duplicated", wrong, "0", lambda v: v == 0),
    ]
    return [{"id": pid, "what": what, "measured": measured, "target": target,
             "met": None if measured is None else bool(check(measured))}
            for pid, what, measured, target, check in rows]


def _number(value, digits=2):
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(results):
    lines = [f"# Benchmark ({results['mode']} run, {results['seconds']} s)", ""]
    v = results["versions"]
    lines += [f"{v['cpus']} CPUs, Python {v['python']}, kernel {v['kernel']}, {v['nginx']}, uWSGI {v['uwsgi']}, "
              f"{v['redis']}. Settings: `{results['settings']}`; limits lifted for the "
              f"run: `{results['stack_settings']}`.", ""]
    lines += ["| Target | What | Measured | Goal | Met |", "|---|---|---|---|---|"]
    for row in results["targets"]:
        met = "n/a" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['id']} | {row['what']} | {_number(row['measured'], 3)} | {row['target']} | {met} |")
    lines += _peers(results)
    for name, section in (("echo", _echo), ("idle", _idle), ("fanout", _fanout), ("handshakes", _handshakes),
                          ("resume", _resume), ("reconnect", _reconnect)):
        if results.get(name):
            lines += section(results)
    return "\n".join(lines) + "\n"


def _peers(results):
    lines = ["", "## Peers", "", "One process each, the library's idiomatic echo at its defaults (bench/peers/), "
             "each behind an nginx of its own rendered from the apps' template.", "",
             "| Peer | Version | Event loop | Keep-alive ping interval (s) | Defaults |", "|---|---|---|---|---|"]
    for name, peer in results["peers"].items():
        ping = "none (sends no pings)" if peer["ping_interval"] is None else _number(peer["ping_interval"], 0)
        settings = ", ".join(f"{k}={v}" for k, v in peer["settings"].items())
        lines.append(f"| {name} | {peer['version']} | {peer['loop']} | {ping} | {settings} |")
    lines += ["", "### Each app against the best peer", "",
              "Ratio: app / best peer on that figure. For msg/s above 1 is ahead of every peer; for the others "
              "(lower is better) below 1 is.", "",
              "| Figure | Best peer | Best peer's value | " + " | ".join(
                  f"{app} | {app} / best" for app in next(iter(results["peer_ratios"]))["apps"]) + " | Every peer |",
              "|---|---|---|" + "---|---|" * len(next(iter(results["peer_ratios"]))["apps"]) + "---|"]
    for row in results["peer_ratios"]:
        apps = " | ".join(f"{_number(a['value'], 1)} | {_number(a['ratio'], 2)}" for a in row["apps"].values())
        every = ", ".join(f"{peer} {_number(value, 1)}" for peer, value in row["peers"].items())
        lines.append(f"| {row['figure']} | {row['best_peer'] or 'n/a'} | {_number(row['best'], 1)} | {apps} | "
                     f"{every} |")
    return lines


def _echo(results):
    lines = ["", "## Echo (closed loop)", "",
              "| Target | Connections | Size (B) | msg/s median | min-max | p50 us | p99 us | p99.9 us | dropped |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(results["echo"], key=lambda r: (r["size"], r["connections"], r["target"])):
        lines.append(f"| {row['target']} | {row['connections']} | {row['size']} | {row['messages_per_second']:.0f} | "
                     f"{row['min']:.0f}-{row['max']:.0f} | {row['p50_us']} | {row['p99_us']} | {row['p999_us']} | "
                     f"{row['dropped']} |")
    return lines


def _idle(results):
    idle = results["idle"]
    pings = f", CPU over {idle['seconds'] // idle['ping_interval']} ping interval(s) of {idle['ping_interval']} s" \
        if idle["seconds"] >= idle["ping_interval"] else ""
    lines = ["", f"## Idle: {idle['connections']} connections held {idle['seconds']} s{pings}, {idle['dropped']} dropped", "",
              "| Processes | CPU % of one core | CPU us per connection per ping | Pings received / expected | "
              "RSS before (MiB) | RSS held (MiB) | KiB per connection |", "|---|---|---|---|---|---|---|"]
    for group, row in idle["processes"].items():
        lines.append(f"| {group} | {row['cpu_percent_of_one_core']:.2f} | {_number(row['cpu_us_per_connection_per_ping'], 1)} | "
                     f"{_pings(row)} | {row['rss_bytes_before'] / MIB:.1f} | {row['rss_bytes_held'] / MIB:.1f} | "
                     f"{row['kib_per_connection']:.1f} |")
    lines += ["", "Peers: each on its fresh process, through its own nginx, CPU over whole intervals of its own "
              "pings (IDLE_SECONDS where it sends none). Per connection: the server's, and its nginx's.", "",
              "| Peer | Connections | Held (s) | Pings per connection | Pings received / expected | CPU % of one core | "
              "CPU us per connection per ping | RSS before (MiB) | RSS held (MiB) | KiB per connection | "
              "nginx KiB per connection | nginx CPU % | Dropped |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in idle["peers"].items():
        per_ping = "no pings" if row["ping_interval"] is None else _number(row["cpu_us_per_connection_per_ping"], 1)
        lines.append(f"| {name} | {row['connections']} | {_number(row['seconds'], 0)} | {row['pings']} | "
                     f"{_pings(row)} | {row['cpu_percent_of_one_core']:.2f} | {per_ping} | {row['rss_bytes_before'] / MIB:.1f} | "
                     f"{row['rss_bytes_held'] / MIB:.1f} | {row['kib_per_connection']:.1f} | "
                     f"{row['nginx']['kib_per_connection']:.1f} | {row['nginx']['cpu_percent_of_one_core']:.2f} | "
                     f"{row['dropped']} |")
    return lines


def _pings(row):
    """Pings that arrived over those due in the window (CPU per ping divides by the former);
    n/a for a process that sends or relays none (Redis, a peer that does not ping) and in
    results from before the bench counted them."""
    if not row.get("pings_expected"):
        return "n/a"
    return f"{row['pings_received']} / {row['pings_expected']}"


def _fanout(results):
    fan = results["fanout"]
    return ["", f"## Chat fan-out: {fan['subscribers']} subscribers, {fan['messages']} messages", "",
            f"{fan['subscribers_ready']} subscribers had their history in time; "
            f"delivered {fan['deliveries']} of {fan['expected']}; p50 {fan['p50_us']} us, p99 {fan['p99_us']} us, "
            f"p99.9 {fan['p999_us']} us; dropped {fan['dropped']}."]


def _handshakes(results):
    lines = ["", "## Handshakes through nginx", ""]
    for target, row in results["handshakes"].items():
        lines.append(f"- {target}: {row['handshakes_per_second']:.0f}/s ({row['failed']} failed)")
    return lines


def _resume(results):
    any_row = next(iter(results["resume"].values()))
    lines = ["", f"## Resume: {any_row['clients']} clients resume a full room at once (last_id=0-0)", "",
             f"The room holds CHAT_STREAM_MAXLEN = {any_row['stream_maxlen']} messages of {any_row['text_bytes']} B; "
             f"each client is sent {any_row['messages_expected']} (CHAT_RESUME_MAX). RSS: the app's processes "
             "together (master and workers), sampled every 10 ms.", "",
             "| App | Time to all history_end (s) | Messages per client | recovered=false | RSS before (MiB) | "
             "RSS peak (MiB) | Peak - before (MiB) | failed attempts |", "|---|---|---|---|---|---|---|---|"]
    for app, row in results["resume"].items():
        lines.append(f"| {app} | {row['seconds_to_all_history_end']:.2f} | {row['messages_min']}-{row['messages_max']} | "
                     f"{row['recovered_false']} | {row['rss_bytes_before'] / MIB:.1f} | {row['rss_bytes_peak'] / MIB:.1f} | "
                     f"{(row['rss_bytes_peak'] - row['rss_bytes_before']) / MIB:.1f} | {row['failed_attempts']} |")
    return lines


def _reconnect(results):
    runs = results["reconnect"]
    any_row = next(iter(next(iter(runs.values())).values()))
    lines = ["", f"## Reconnect: {any_row['clients']} clients, rolling restart of {any_row['replicas']} replicas of one app",
             "", "Handshakes per second: client-side, completed handshakes in 100 ms bins, times 10. Time: from the "
             "first close 1001 to the last client's history_end after its reconnect (the restart of every replica "
             "included). Lost and duplicated: message ids each client received against the room's stream.", "",
             "| App | Window (ms) | Closes 1001 | Peak handshakes/s | First 1001 to all resumed (s) | Per replica: "
             "closes, peak/s, to all resumed (s) | Resumes | recovered=false | Failed attempts | Not resumed | Lost | "
             "Duplicated | Other close codes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for app, windows in runs.items():
        for window, row in windows.items():
            others = {code: n for code, n in row["close_codes"].items() if code != "1001"}
            waves = "; ".join(f"{w['closes_1001']}, {w['peak_handshakes_per_second']}, "
                              f"{_number(w['first_1001_to_all_resumed_s'])}" for w in row["waves"])
            lines.append(f"| {app} | {window} | {row['closes_1001']} | {row['peak_handshakes_per_second']} | "
                         f"{_number(row['first_1001_to_all_resumed_s'])} | {waves} | {row['resumes']} | "
                         f"{row['not_recovered']} | {row['failed_attempts']} | {row['not_resumed']}"
                         f"{' (' + str(row['never_connected']) + ' never connected)' if row['never_connected'] else ''} | "
                         f"{row['lost']} | "
                         f"{row['duplicated']} | {others or '-'} |")
            for step in row["timeline"]:
                if step.get("error"):
                    lines.append(f"|  | replica {step['replica']}: {step['error']} |" + " |" * 11)
    for app, windows in runs.items():
        peaks = {int(w): row["peak_handshakes_per_second"] for w, row in windows.items()}
        if 0 in peaks and len(peaks) > 1 and peaks[0]:
            spread = max(peaks)
            lines.append(f"\n{app}: with a {spread} ms window the peak is {peaks[spread] / peaks[0]:.2f} of the peak "
                         "without one.")
    return lines


def plots(results, out):
    """throughput.png, latency.png, memory.png, resume.png, reconnect.png in `out` (those of
    the workloads that ran)."""
    if results.get("echo"):
        _echo_plots(results, out)
    if results.get("idle"):
        _memory_plot(results, out)
    if results.get("resume"):
        _resume_plot(results, out)
    if results.get("reconnect"):
        _reconnect_plot(results, out)


def _echo_plots(results, out):
    sizes = sorted({row["size"] for row in results["echo"]})
    figure, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for axis, size in zip(axes[0], sizes):
        for target in sorted({row["target"] for row in results["echo"]}):
            points = sorted((row["connections"], row["messages_per_second"]) for row in results["echo"]
                            if row["target"] == target and row["size"] == size)
            axis.plot([c for c, _ in points], [r for _, r in points], marker="o", label=target)
        axis.set(title=f"{size} B messages", xlabel="connections", ylabel="messages/s")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "throughput.png", dpi=100)
    plt.close(figure)

    connections = max(row["connections"] for row in results["echo"])
    size = min(sizes)
    figure, axis = plt.subplots(figsize=(7, 4))
    for row in results["echo"]:
        if row["connections"] == connections and row["size"] == size and row["curve_us"]:
            points = sorted((float(p), v) for p, v in row["curve_us"].items())
            axis.plot([str(p) for p, _ in points], [v for _, v in points], marker="o", label=row["target"])
    axis.set(title=f"latency distribution, {connections} connections x {size} B", xlabel="percentile",
             ylabel="latency (us)", yscale="log")
    _save(figure, [axis], out / "latency.png")


def _save(figure, legend_axes, path):
    for axis in legend_axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _memory_plot(results, out):
    """Left: the stack's processes against the connections through its nginx. Right: the growth
    of each server (app or peer) against the connections it holds itself."""
    idle = results["idle"]
    figure, (stack_axis, server_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    steps = idle["steps"]
    for group in steps[0]["rss_bytes"]:
        stack_axis.plot([0] + [s["connections"] for s in steps],
                        [idle["processes"][group]["rss_bytes_before"] / MIB] +
                        [s["rss_bytes"][group] / MIB for s in steps], marker="o", label=group)
    stack_axis.set(title="the stack: resident memory vs idle connections", xlabel="connections (both apps)",
                   ylabel="RSS (MiB)")
    servers = [(app, [(s["connections"] // 2, s["rss_bytes"][app]) for s in steps], idle["processes"][app])
               for app in idle["processes"] if app.endswith("-app")]
    servers += [(name, [(s["connections"], s["rss_bytes"][name]) for s in row["steps"]], row)
                for name, row in idle["peers"].items()]
    for name, points, row in servers:
        server_axis.plot([0] + [c for c, _ in points], [0] + [(rss - row["rss_bytes_before"]) / MIB for _, rss in points],
                         marker="o", label=f"{name} ({row['kib_per_connection']:.1f} KiB/conn)")
    server_axis.set(title="each server: RSS growth vs the idle connections it holds", xlabel="connections",
                    ylabel="RSS growth (MiB)")
    _save(figure, [stack_axis, server_axis], out / "memory.png")


def _resume_plot(results, out):
    figure, axis = plt.subplots(figsize=(7, 4))
    for app, row in results["resume"].items():
        axis.plot([t for t, _ in row["rss_curve"]], [rss / MIB for _, rss in row["rss_curve"]], label=app)
    any_row = next(iter(results["resume"].values()))
    axis.set(title=f"app RSS while {any_row['clients']} clients resume {any_row['messages_expected']} messages each",
             xlabel="seconds (the clients connect at 0.5 s)", ylabel="RSS of the app's processes (MiB)")
    _save(figure, [axis], out / "resume.png")


def _reconnect_plot(results, out):
    """Per app, the histogram of completed handshakes in 100 ms bins over the rolling restart,
    one curve per reconnect window; dotted lines: each replica's stop."""
    runs = results["reconnect"]
    figure, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), squeeze=False)
    for axis, (app, windows) in zip(axes[:, 0], runs.items()):
        for window, row in windows.items():
            width = row["bin_ms"] / 1000
            times = [i * width for i in range(len(row["handshake_bins"]))]
            line, = axis.step(times, [n / width for n in row["handshake_bins"]], where="post",
                              label=f"window {window} ms (peak {row['peak_handshakes_per_second']}/s)")
            for step in row["timeline"]:
                axis.axvline(step["stop_sent_at"], color=line.get_color(), linestyle=":", alpha=0.7)
        axis.set(title=f"{app}: reconnect wave of {row['clients']} clients, rolling restart of {row['replicas']} replicas",
                 xlabel="seconds (dotted: a replica is stopped)", ylabel="handshakes/s (100 ms bins)")
    _save(figure, axes[:, 0], out / "reconnect.png")
