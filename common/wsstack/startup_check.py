"""uWSGI start-up check: refuse to start with settings or a build that cannot work.

uwsgi-base.ini runs this file with `exec-asap`, before uWSGI binds a socket, forks,
or loads the app; a non-zero exit stops uWSGI with the message printed here.

1. Settings. uWSGI reads UWSGI_<OPTION> variables itself and turns a malformed number
   into 0 without a word: UWSGI_PROCESSES=two gives a master with no workers that never
   serves and never exits.
2. SSL. uWSGI computes Sec-WebSocket-Accept with OpenSSL's SHA-1; a binary compiled
   without libssl-dev lacks it, and every `uwsgi.websocket_handshake()` fails.
3. Option names (`--options`, run earlier, see below). uWSGI turns every UWSGI_<NAME>
   variable into the option <name> and, in strict mode (uwsgi-base.ini), exits on one it does
   not know with a one-line "[strict-mode] unknown config directive". Kubernetes injects
   such variables for every Service of the namespace unless the pod sets
   `enableServiceLinks: false`: the Service uwsgi-app brings UWSGI_APP_SERVICE_HOST,
   UWSGI_APP_PORT and more, and every pod crash-loops. This names each offending variable
   and what to do about it.
4. Patches. A stock uWSGI (`uwsgi --version` without the -wsstack label of
   common/uwsgi-patches/0008) has the WebSocket defects the patch set fixes; one client can
   crash a worker. WSSTACK_ALLOW_STOCK_UWSGI=1 lets it start anyway (for comparisons).

Why a separate process and not a check inside the app: the SSL check runs
`uwsgi --cflags`, and a subprocess started in the master under gevent's monkey-patching
creates gevent's loop before the fork. Every worker then shares that loop's wake-up
eventfd, a signal meant for one worker can be consumed by another, and a graceful stop
hangs until the loop's next timer.

Strict mode refuses an unknown option while uWSGI applies its configuration, before any
`exec-asap` command runs, so the option-name check cannot be one: uwsgi-base.ini reads
`ini = exec://... --options` first, which uWSGI runs while it reads its ini files (before it
applies anything). uWSGI ignores that command's exit status; the check prints its message
to stderr and to stdout only `strict = true`, and strict mode then stops uWSGI.

Standard library only: it runs under whatever `python3` is on PATH.
"""
import os
import re
import subprocess
import sys

# environment variable -> smallest valid value
NUMERIC_VARIABLES = {
    "UWSGI_PROCESSES": 1,
    "UWSGI_LISTEN": 1,
    "UWSGI_GEVENT": 1,
    "UWSGI_MAX_VARS": 16,
    "UWSGI_WEBSOCKETS_MAX_SIZE": 1,
    "UWSGI_WEBSOCKETS_PING_FREQ": 1,
    "UWSGI_WEBSOCKETS_PONG_TOLERANCE": 1,
    "UWSGI_WORKER_RELOAD_MERCY": 1,
    "UWSGI_SOCKET_TIMEOUT": 1,
}
SHELLS = {"sh", "dash", "bash"}


class StartupError(RuntimeError):
    pass


# HOST:PORT settings; the metrics socket is told from the public one by its port
SOCKET_VARIABLES = ("UWSGI_HTTP_SOCKET", "METRICS_HTTP_SOCKET", "UWSGI_STATS")


def socket_port(name, value):
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise StartupError(f"{name} must be HOST:PORT with a port from 1 to 65535, got {value!r}")
    return int(port)


def check_environment(environ):
    """Raise StartupError naming the first invalid variable."""
    for name, minimum in NUMERIC_VARIABLES.items():
        raw = environ.get(name)
        if raw is None:
            continue
        if not raw.strip().isdigit():
            raise StartupError(f"{name} must be a whole number, got {raw!r}")
        if int(raw) < minimum:
            raise StartupError(f"{name} must be at least {minimum}, got {raw!r}")
    ports = {name: socket_port(name, environ[name]) for name in SOCKET_VARIABLES if name in environ}
    if len(set(ports.values())) != len(ports):
        raise StartupError(f"{', '.join(ports)} must use different ports, got {ports}")


# Variables uWSGI's parse_sys_envs() (core/utils.c) skips: its own internal state, not options.
UWSGI_INTERNAL_VARIABLES = {"UWSGI_RELOADS", "UWSGI_VASSALS_DIR", "UWSGI_EMPEROR_FD", "UWSGI_BROODLORD_NUM",
                            "UWSGI_EMPEROR_FD_CONFIG", "UWSGI_EMPEROR_PROXY", "UWSGI_JAIL_PID",
                            "UWSGI_ORIGINAL_PROC_NAME"}
# What the kubelet injects for a Service named S (S upper-cased, "-" as "_"): S_SERVICE_HOST,
# S_SERVICE_PORT[_<PORT NAME>], S_PORT, S_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR].
SERVICE_LINK = re.compile(r"(?P<service>[A-Z0-9_]+?)_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)")


def option_name(variable):
    """The uWSGI option a UWSGI_* variable sets (core/utils.c env_to_arg: lower case, _ as -)."""
    return variable[len("UWSGI_"):].lower().replace("_", "-")


def known_options(binary):
    """Every option this uWSGI binary accepts (its --help lists them, plugins' included)."""
    # Without any UWSGI_* variable: the listing must not depend on what is being checked.
    environ = {name: value for name, value in os.environ.items() if not name.startswith("UWSGI_")}
    result = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=10, env=environ)
    options = set(re.findall(r"^\s+(?:-\w\|)?--([a-z0-9][a-z0-9-]*)", result.stdout, re.M))
    if len(options) < 100:  # a binary that did not list its options: refuse rather than guess
        raise StartupError(f"could not read the options of {binary} from its --help")
    return options


def check_option_names(environ, options):
    """Raise StartupError naming every UWSGI_* variable that is not an option of this uWSGI."""
    unknown = sorted(name for name in environ if name.startswith("UWSGI_")
                     and name not in UWSGI_INTERNAL_VARIABLES and option_name(name) not in options)
    if not unknown:
        return
    lines = []
    for name in unknown:
        link = SERVICE_LINK.fullmatch(name)
        if link:
            service = link.group("service").lower().replace("_", "-")
            lines.append(f"{name}: not a uWSGI option; it looks like a Kubernetes service link variable of "
                         f"the Service {service!r}. Set enableServiceLinks: false in the pod spec")
        else:
            lines.append(f"{name}: not a uWSGI option (uWSGI reads every UWSGI_* variable as the option "
                         f"{option_name(name)!r}); unset or rename it")
    raise StartupError("uWSGI would refuse these environment variables in strict mode:\n  " + "\n  ".join(lines))


def parent_uwsgi_binary():
    """The executable of the uWSGI process that ran us (through `sh -c` or directly)."""
    pid = os.getppid()
    for _ in range(3):
        exe = os.readlink(f"/proc/{pid}/exe")
        if os.path.basename(exe) not in SHELLS:
            return exe
        with open(f"/proc/{pid}/stat") as stat:
            # the field after the parenthesised command name: state, then the parent's pid
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
    raise StartupError("could not find the uWSGI process that started this check")


def build_cflags(binary):
    result = subprocess.run([binary, "--cflags"], capture_output=True, text=True, timeout=10, check=True)
    return result.stdout.split()


def require_ssl(binary):
    if "-DUWSGI_SSL" not in build_cflags(binary):
        raise StartupError(
            f"{binary} was built without SSL support, so the WebSocket handshake cannot work. "
            "Install libssl-dev (Debian) and rebuild: pip install --no-binary uWSGI --no-cache-dir uWSGI"
        )


def require_patches(binary, environ):
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    if version.endswith("-wsstack"):
        return "with the project's patches"
    if environ.get("WSSTACK_ALLOW_STOCK_UWSGI") == "1":
        return f"STOCK ({version}, allowed by WSSTACK_ALLOW_STOCK_UWSGI=1)"
    raise StartupError(
        f"{binary} is uWSGI {version} without the project's WebSocket patches (common/uwsgi-patches); "
        "build it with common/build-uwsgi.sh (make bootstrap does)"
    )


def main():
    if sys.argv[1:] == ["--options"]:
        # uWSGI reads this output as an ini file and warns about one without an option: restate
        # strict mode, which is what stops uWSGI after a failed check.
        print("[uwsgi]\nstrict = true")
        try:
            check_option_names(os.environ, known_options(parent_uwsgi_binary()))
        except StartupError as exc:
            print(f"startup check failed: {exc}", file=sys.stderr)
            return 1
        return 0
    try:
        check_environment(os.environ)
        binary = parent_uwsgi_binary()
        require_ssl(binary)
        patches = require_patches(binary, os.environ)
    except StartupError as exc:
        print(f"startup check failed: {exc}", file=sys.stderr)
        return 1
    print(f"startup check passed: settings valid, {binary} built with SSL, {patches}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
