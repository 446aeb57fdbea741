"""What a peer prints on its stdout once it accepts connections: one JSON line that bench.py
waits for (its readiness signal) and records (the library's version and defaults)."""
import json


def announce(name, port, version, ping_interval, settings, loop):
    """ping_interval: seconds between the server's keep-alive pings at its defaults, or None
    where it sends none."""
    print(json.dumps({"peer": name, "listening": f"127.0.0.1:{port}", "version": version,
                      "ping_interval": ping_interval, "settings": settings, "loop": loop}), flush=True)
