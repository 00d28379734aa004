"""A real Redis for the integration tests (and the rate-limit benchmark).

`RedisServer` runs /usr/bin/redis-server (the Debian package; override with
GATEWAY_TEST_REDIS_BIN) in the foreground on 127.0.0.1 and a free port, in a
scratch directory of its own, with nothing persisted (`--save "" --appendonly
no`), so a restart (same port) comes back empty. start() waits, with a deadline,
until `redis-cli -p PORT ping` answers PONG; stop() is SHUTDOWN NOSAVE (SIGTERM,
then SIGKILL at a deadline), kill() is SIGKILL (a crash: the gateway's
connections see a reset), restart() is stop() + start() on the same port.
cli(*args) runs redis-cli and returns its stdout; pause(seconds) makes every
client's commands wait (CLIENT PAUSE, mode ALL) to simulate a slow Redis, and
debug_sleep(seconds) blocks the whole server (DEBUG SLEEP, sent in the
background: enabled for local connections with --enable-debug-command local).
url() is what a gateway's redis.url should say; redis_section() the whole
`redis:` section.

Redis runs fine as root: no user switching. A watchdog process (one per server,
its own session) holds the read end of a pipe from us; when the pipe closes - we
closed the server, or the test process died, even by SIGKILL - it kills a
redis-server still running from the pid file and removes the scratch directory.

The module-scoped fixture `redis_server` (`from redis_server import
redis_server`) starts one server per test file and always stops it; a failed
test's report gets the server's log tail.
"""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import free_port

REDIS_BIN = os.environ.get("GATEWAY_TEST_REDIS_BIN") or shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = os.environ.get("GATEWAY_TEST_REDIS_CLI") or shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 10.0

ACTIVE = []  # servers running now: stopped at exit, their logs shown on failure

_WATCHDOG = r"""# tests/integration/redis_server.py watchdog: kills a test redis-server its owner left behind
import os, shutil, signal, sys
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
pidfile, scratch, keep = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
while sys.stdin.buffer.read(4096):
    pass
try:
    pid = int(open(pidfile).read().strip())
    cmd = open("/proc/%d/cmdline" % pid, "rb").read()
    if b"redis-server" in cmd:
        os.kill(pid, signal.SIGKILL)
except Exception:
    pass
if not keep:
    shutil.rmtree(scratch, ignore_errors=True)
"""


class RedisError(AssertionError):
    pass


class RedisServer:
    def __init__(self, name="redis", scratch=None, password=None, extra_args=()):
        self.name = name
        self.scratch = Path(scratch) if scratch else Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.port = None
        self.host = "127.0.0.1"
        self.password = password
        self.extra_args = list(extra_args)
        self.log_path = self.scratch / ("%s.log" % name)
        self.pid_path = self.scratch / ("%s.pid" % name)
        self.proc = None
        self.watchdog = None

    # --- life cycle --------------------------------------------------------------
    def _argv(self):
        argv = [REDIS_BIN, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--dir", str(self.scratch), "--pidfile", str(self.pid_path), "--logfile", str(self.log_path),
                "--daemonize", "no", "--protected-mode", "no", "--databases", "16",
                "--enable-debug-command", "local"]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv + self.extra_args

    def start(self, timeout=START_TIMEOUT):
        """Start (on the port of the previous run, if any) and wait for PONG."""
        if self.running():
            return self
        if not os.access(REDIS_BIN, os.X_OK):
            raise RedisError("redis-server not found at %s (apt-get install redis-server, or set "
                             "GATEWAY_TEST_REDIS_BIN)" % REDIS_BIN)
        self._start_watchdog()
        fixed = self.port is not None
        for attempt in range(3):
            if not fixed:
                self.port = free_port()
            self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=open(self.scratch / ("%s.stderr" % self.name), "ab"),
                                         cwd=str(self.scratch), start_new_session=True)
            if self not in ACTIVE:
                ACTIVE.append(self)
            try:
                self.wait_ping(timeout)
                return self
            except RedisError:
                if self.proc.poll() is not None and "in use" in self.log() and attempt < 2:
                    if fixed:  # the same port: whoever holds it may let go (TIME_WAIT is no issue for listen)
                        time.sleep(0.1)
                    continue
                raise
        return self

    def wait_ping(self, timeout=START_TIMEOUT):
        def pong():
            if self.proc.poll() is not None:
                raise RedisError("redis-server exited with %s during start-up\n%s"
                                 % (self.proc.returncode, self.log_tail()))
            return self.ping()
        deadline = time.monotonic() + timeout
        while True:
            if pong():
                return
            if time.monotonic() >= deadline:
                raise RedisError("redis-server on port %s did not answer PING within %.0fs\n%s"
                                 % (self.port, timeout, self.log_tail()))
            time.sleep(0.03)

    def ping(self):
        try:
            res = self._cli_run(["ping"], timeout=2)
        except subprocess.TimeoutExpired:
            return False
        return res.returncode == 0 and res.stdout.strip() == "PONG"

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM (redis-server shuts down without saving: --save ""), SIGKILL at the deadline."""
        if not self.running():
            return self
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self

    def kill(self):
        """SIGKILL: like a crash; every client connection is reset."""
        if self.running():
            self.proc.kill()
            self.proc.wait(5)
        return self

    def restart(self, timeout=START_TIMEOUT):
        self.stop()
        return self.start(timeout)

    def close(self):
        """Stop (kill if needed) and remove the scratch directory. Never raises."""
        try:
            try:
                self.stop(timeout=5)
            except Exception:  # noqa: BLE001
                self.kill()
        finally:
            self._stop_watchdog()
            if self in ACTIVE:
                ACTIVE.remove(self)
            if not os.environ.get("GATEWAY_TEST_KEEP"):
                shutil.rmtree(self.scratch, ignore_errors=True)

    def _start_watchdog(self):
        if self.watchdog is not None and self.watchdog.poll() is None:
            return
        keep = "1" if os.environ.get("GATEWAY_TEST_KEEP") else "0"
        self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(self.pid_path), str(self.scratch),
                                          keep], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True, cwd="/")

    def _stop_watchdog(self):
        if self.watchdog is None:
            return
        try:
            self.watchdog.stdin.close()
            self.watchdog.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.watchdog.kill()
            self.watchdog.wait(5)
        self.watchdog = None

    # --- talking to it ------------------------------------------------------------------
    def _cli_argv(self, args):
        argv = [REDIS_CLI, "-h", self.host, "-p", str(self.port)]
        if self.password:
            argv += ["--no-auth-warning", "-a", self.password]
        return argv + [str(a) for a in args]

    def _cli_run(self, args, timeout=CLI_TIMEOUT):
        return subprocess.run(self._cli_argv(args), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def cli(self, *args, timeout=CLI_TIMEOUT):
        """redis-cli ARGS against this server: its stdout (raw, one reply item a line).
        Fails on a non-zero exit or an error reply."""
        try:
            res = self._cli_run(args, timeout)
        except subprocess.TimeoutExpired:
            raise RedisError("redis-cli %s did not finish within %.0fs\n%s" % (" ".join(map(str, args)), timeout,
                                                                             self.log_tail()))
        if res.returncode != 0 or res.stdout.startswith("ERR") or res.stdout.startswith("(error)"):
            raise RedisError("redis-cli %s failed (exit %d): %s %s" % (" ".join(map(str, args)), res.returncode,
                                                                      res.stdout.strip(), res.stderr.strip()))
        return res.stdout

    def keys(self, pattern="*"):
        return [k for k in self.cli("--scan", "--pattern", pattern).splitlines() if k]

    def info(self, section=None):
        """INFO [section] as a dict of its key: value lines."""
        out = {}
        for line in self.cli(*(["info"] + ([section] if section else []))).splitlines():
            if ":" in line and not line.startswith("#"):
                k, v = line.split(":", 1)
                out[k] = v.strip()
        return out

    def command_calls(self, command):
        """How many times COMMAND ran (INFO commandstats), 0 if never."""
        stat = self.info("commandstats").get("cmdstat_%s" % command.lower())
        if not stat:
            return 0
        fields = dict(kv.split("=", 1) for kv in stat.split(","))
        return int(fields["calls"])

    def pause(self, seconds):
        """Every client's commands wait `seconds` (CLIENT PAUSE ms ALL); returns at once."""
        self.cli("client", "pause", str(int(seconds * 1000)), "ALL")

    def unpause(self):
        self.cli("client", "unpause")

    def debug_sleep(self, seconds):
        """Block the whole server for `seconds` (DEBUG SLEEP), sent in the background:
        returns the redis-cli Popen (wait() on it when done)."""
        return subprocess.Popen(self._cli_argv(["debug", "sleep", "%.3f" % seconds]), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)

    def flushall(self):
        self.cli("flushall")

    def url(self, db=0, with_password=False):
        auth = ":%s@" % self.password if (with_password and self.password) else ""
        return "redis://%s%s:%d/%d" % (auth, self.host, self.port, db)

    def redis_section(self, timeout="200ms", **extra):
        """A gateway `redis:` section for this server (password as its own key)."""
        sec = {"url": self.url(), "timeout": timeout}
        if self.password:
            sec["password"] = self.password
        sec.update(extra)
        return sec

    # --- logs ---------------------------------------------------------------------------
    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=30):
        lines = self.log().splitlines()
        return "---- redis log (%s), last %d lines ----\n%s" % (self.log_path, min(n, len(lines)),
                                                                "\n".join(lines[-n:]))

    def summary(self):
        return "redis %s port %s (%s)\n%s" % (self.name, self.port, "running" if self.running() else "stopped",
                                              self.log_tail())


@atexit.register
def _stop_all():
    for r in list(ACTIVE):
        try:
            r.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class _Reporter:
    """Attaches running servers' log tails to failed tests' reports."""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        rep = outcome.get_result()
        if rep.failed and rep.when in ("setup", "call"):
            for r in list(ACTIVE):
                rep.sections.append(("redis %s" % r.name, r.summary()))


def _ensure_reporter(config):
    if not config.pluginmanager.has_plugin("gateway-redis-reporter"):
        config.pluginmanager.register(_Reporter(), "gateway-redis-reporter")


@pytest.fixture(scope="module")
def redis_server(request):
    """One running Redis for the test file; stopped and removed afterwards whatever happened."""
    _ensure_reporter(request.config)
    r = RedisServer(name=request.module.__name__.rsplit(".", 1)[-1])
    request.addfinalizer(r.close)
    r.start()
    return r
