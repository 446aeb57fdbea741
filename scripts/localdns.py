"""Local mode's service-name DNS: what compose's embedded DNS server is to the containers.

nginx resolves the apps' service names (uwsgi-app, flask-app) at request time in both modes.
In compose the engine's DNS answers them; locally `make run` starts Debian's dnsmasq on
loopback, answering only from a hosts file the runner writes (one line per replica address).
Rewriting that file and sending SIGHUP is how a record changes, as when a container is
recreated with a new address.
"""
import os
import pwd
import secrets
import socket
import struct
from pathlib import Path


def dnsmasq_argv(hosts_file, port, ttl, listen="127.0.0.1"):
    """dnsmasq as a foreground child: our hosts file only, no upstream, no system files.
    (make test-k8s listens on its podman network's gateway instead of loopback.)"""
    return [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        f"--listen-address={listen}", "--bind-interfaces", f"--port={port}",
        f"--addn-hosts={hosts_file}", f"--local-ttl={ttl}",
        # As root it would switch to `nobody`, who may not read the run directory.
        f"--user={pwd.getpwuid(os.geteuid()).pw_name}",
        "--pid-file=", "--log-facility=-",
    ]


def write_hosts(hosts_file, records):
    """records: {name: [address, ...]}. Replaced in one rename: dnsmasq never reads half a file."""
    hosts_file = Path(hosts_file)
    lines = [f"{address} {name}\n" for name, addresses in records.items() for address in addresses]
    partial = hosts_file.with_suffix(".partial")
    partial.write_text("".join(lines))
    partial.replace(hosts_file)


def query_a(name, port, server="127.0.0.1", timeout=1.0):
    """The IPv4 addresses a DNS server gives for `name` (empty when it has none)."""
    query_id = secrets.randbits(16)
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    packet = struct.pack(">HHHHHH", query_id, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, port))
        reply = sock.recv(4096)
    reply_id, flags, _qdcount, ancount = struct.unpack(">HHHH", reply[:8])
    if reply_id != query_id:
        raise OSError("DNS reply for another query")
    if flags & 0x000F:  # NXDOMAIN, REFUSED, ...: no record
        return []
    offset = 12 + len(question) + 4
    addresses = []
    for _ in range(ancount):
        offset += 2 if reply[offset] & 0xC0 == 0xC0 else len(question)  # compressed or full name
        rtype, _rclass, _ttl, length = struct.unpack(">HHIH", reply[offset:offset + 10])
        offset += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(reply[offset:offset + 4]))
        offset += length
    return addresses
