"""The benchmark's outputs: target ratios (P1-P5), a Markdown report, PNG plots."""
import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

MIB = 1024 * 1024


def echo_rate(results, target, cell):
    connections, size = cell
    for row in results["echo"]:
        if (row["target"], row["connections"], row["size"]) == (target, connections, size):
            return row["messages_per_second"]
    return None


def ratio(numerator, denominator):
    return None if not numerator or not denominator else numerator / denominator


def targets(results, cell):
    """[{id, what, measured, target, met}] for the targets P1-P5 (docs/benchmark.md)."""
    rate = lambda target: echo_rate(results, target, cell)  # noqa: E731
    where = f"{cell[0]} connections x {cell[1]} B"
    processes = results["idle"]["processes"]
    app_cpu = sum(processes[app]["cpu_percent_of_one_core"] for app in ("uwsgi-app", "flask-app"))
    worst_kib = max(processes[app]["kib_per_connection"] for app in ("uwsgi-app", "flask-app"))
    fanout_p99 = results["fanout"]["p99_us"]
    rows = [
        ("P1", f"nginx overhead: uwsgi-app via nginx / direct, {where}",
         ratio(rate("uwsgi-app via nginx"), rate("uwsgi-app direct")), ">= 0.60", lambda v: v >= 0.60),
        ("P2", f"flask-app / uwsgi-app, both via nginx, {where}",
         ratio(rate("flask-app via nginx"), rate("uwsgi-app via nginx")), ">= 0.80", lambda v: v >= 0.80),
        ("P3", f"uwsgi-app / reference server, both via nginx, {where}",
         ratio(rate("uwsgi-app via nginx"), rate("reference via nginx")), ">= 0.90", lambda v: v >= 0.90),
        ("P4a", f"{results['idle']['connections']} idle connections: CPU of both apps, % of one core",
         app_cpu, "< 1", lambda v: v < 1),
        ("P4b", "idle: memory per connection, worst app, KiB", worst_kib, "<= 20", lambda v: v <= 20),
        ("P4c", "idle: connections dropped", results["idle"]["dropped"], "0", lambda v: v == 0),
        ("P5", f"chat fan-out to {results['fanout']['subscribers']} subscribers: p99 delivery, ms",
         None if fanout_p99 is None else fanout_p99 / 1000, "< 100", lambda v: v < 100),
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
              f"{v['redis']}, picows {v['picows']}. Settings: `{results['settings']}`; limits lifted for the "
              f"run: `{results['stack_settings']}`.", ""]
    lines += ["| Target | What | Measured | Goal | Met |", "|---|---|---|---|---|"]
    for row in results["targets"]:
        met = "n/a" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['id']} | {row['what']} | {_number(row['measured'], 3)} | {row['target']} | {met} |")
    lines += ["", "## Echo (closed loop)", "",
              "| Target | Connections | Size (B) | msg/s median | min-max | p50 us | p99 us | p99.9 us | dropped |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(results["echo"], key=lambda r: (r["size"], r["connections"], r["target"])):
        lines.append(f"| {row['target']} | {row['connections']} | {row['size']} | {row['messages_per_second']:.0f} | "
                     f"{row['min']:.0f}-{row['max']:.0f} | {row['p50_us']} | {row['p99_us']} | {row['p999_us']} | "
                     f"{row['dropped']} |")
    idle = results["idle"]
    pings = f", CPU over {idle['seconds'] // idle['ping_interval']} ping interval(s) of {idle['ping_interval']} s" \
        if idle["seconds"] >= idle["ping_interval"] else ""
    lines += ["", f"## Idle: {idle['connections']} connections held {idle['seconds']} s{pings}, {idle['dropped']} dropped", "",
              "| Processes | CPU % of one core | RSS before (MiB) | RSS held (MiB) | KiB per connection |",
              "|---|---|---|---|---|"]
    for group, row in idle["processes"].items():
        lines.append(f"| {group} | {row['cpu_percent_of_one_core']:.2f} | {row['rss_bytes_before'] / MIB:.1f} | "
                     f"{row['rss_bytes_held'] / MIB:.1f} | {row['kib_per_connection']:.1f} |")
    fan = results["fanout"]
    lines += ["", f"## Chat fan-out: {fan['subscribers']} subscribers, {fan['messages']} messages", "",
              f"{fan['subscribers_ready']} subscribers had their history in time; "
              f"delivered {fan['deliveries']} of {fan['expected']}; p50 {fan['p50_us']} us, p99 {fan['p99_us']} us, "
              f"p99.9 {fan['p999_us']} us; dropped {fan['dropped']}.", "", "## Handshakes through nginx", ""]
    for target, row in results["handshakes"].items():
        lines.append(f"- {target}: {row['handshakes_per_second']:.0f}/s ({row['failed']} failed)")
    return "\n".join(lines) + "\n"


def plots(results, out):
    """throughput.png, latency.png, memory.png in `out`."""
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
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "latency.png", dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4))
    steps = results["idle"]["steps"]
    for group in steps[0]["rss_bytes"]:
        axis.plot([0] + [s["connections"] for s in steps],
                  [results["idle"]["processes"][group]["rss_bytes_before"] / MIB] +
                  [s["rss_bytes"][group] / MIB for s in steps], marker="o", label=group)
    axis.set(title="resident memory vs idle connections", xlabel="connections", ylabel="RSS (MiB)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / "memory.png", dpi=100)
    plt.close(figure)
