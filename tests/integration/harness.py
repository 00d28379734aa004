"""The integration-test harness: start the real gateway binary and talk to it.

Every gateway runs in a fresh scratch directory on a free loopback port, with its
configuration written there as YAML, its stdout (the access log) and stderr (the
diagnostic log) captured to files there. start() waits, with a deadline, until GET
/live answers 200; stop() sends SIGTERM and waits, with a deadline, for exit code 0
and a stderr free of sanitizer reports (the suite also runs on an ASan+UBSan build,
where a report means a non-zero exit). Nothing here sleeps to wait for something:
every wait polls a condition until a deadline and then fails with a message.

conftest.py ties these objects to pytest: it stops them after each test (or module)
even when the test failed, and attaches their logs to the report of a failed test.
"""

import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

try:
    from urllib3.exceptions import InsecureRequestWarning

    warnings.simplefilter("ignore", InsecureRequestWarning)
except ImportError:  # pragma: no cover
    pass

SOURCE_DIR = Path(os.environ.get("GATEWAY_SOURCE_DIR") or Path(__file__).resolve().parents[2])
GATEWAY_BIN = os.environ.get("GATEWAY_BIN") or str(SOURCE_DIR / "build" / "gateway")
# Generous: the same suite runs on a sanitizer build on a 2-core CI box.
START_TIMEOUT = float(os.environ.get("GATEWAY_TEST_START_TIMEOUT", "10"))
STOP_TIMEOUT = float(os.environ.get("GATEWAY_TEST_STOP_TIMEOUT", "15"))

SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "WARNING: ThreadSanitizer", "ERROR: UndefinedBehaviorSanitizer")

# Gateways and upstreams alive right now; conftest.py prints their logs when a test fails.
ACTIVE = []


def project_version():
    """The version CMakeLists.txt gives the project (what --version and build_info must say)."""
    text = (SOURCE_DIR / "CMakeLists.txt").read_text()
    m = re.search(r"project\(\s*gateway\s+VERSION\s+([0-9][0-9A-Za-z.\-]*)", text)
    assert m, "no project(gateway VERSION x.y.z) in CMakeLists.txt"
    return m.group(1)


# ---------------------------------------------------------------------------
# Waiting

class Deadline(AssertionError):
    pass


def wait_until(predicate, timeout, message, interval=0.02):
    """Poll predicate() until it returns something truthy; return that. An exception
    from predicate counts as "not yet". At the deadline fail with `message`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last_error = e
        if time.monotonic() >= deadline:
            extra = " (last error: %r)" % (last_error,) if last_error else ""
            raise Deadline("%s: not within %.1fs%s" % (message, timeout, extra))
        time.sleep(interval)


# ---------------------------------------------------------------------------
# Ports and scratch directories

def free_port():
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scratch_dir(prefix="gw-test-"):
    return Path(tempfile.mkdtemp(prefix=prefix))


# ---------------------------------------------------------------------------
# YAML written by hand (no PyYAML needed): block mappings, flow lists of scalars,
# block lists of mappings. Scalars are plain when that is unambiguous, else
# double-quoted (JSON string syntax is valid YAML).

_PLAIN = re.compile(r"[A-Za-z0-9_/.][A-Za-z0-9_./+-]*\Z")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "~", "y", "n"}


def yaml_scalar(v):
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return repr(v)
    v = str(v)
    if _PLAIN.match(v) and v.lower() not in _YAML_WORDS:
        return v
    return json.dumps(v)


def _is_scalar(v):
    return not isinstance(v, (dict, list, tuple))


def _yaml_lines(obj, indent):
    pad = " " * indent
    out = []
    for k, v in obj.items():
        key = yaml_scalar(k)
        if _is_scalar(v):
            out.append("%s%s: %s" % (pad, key, yaml_scalar(v)))
        elif isinstance(v, dict):
            if not v:
                out.append("%s%s: {}" % (pad, key))
            else:
                out.append("%s%s:" % (pad, key))
                out += _yaml_lines(v, indent + 2)
        elif all(_is_scalar(x) for x in v):
            out.append("%s%s: [%s]" % (pad, key, ", ".join(yaml_scalar(x) for x in v)))
        else:
            out.append("%s%s:" % (pad, key))
            for item in v:
                assert isinstance(item, dict), "lists hold scalars or mappings only"
                sub = _yaml_lines(item, indent + 4)
                sub[0] = pad + "  - " + sub[0][indent + 4:]
                out += sub
    return out


def to_yaml(obj):
    return "\n".join(_yaml_lines(obj, 0)) + "\n"


# ---------------------------------------------------------------------------
# Configurations

def upstream_config(targets, **overrides):
    """An upstreams.<name> entry with the suite's short timeouts."""
    cfg = {
        "targets": [t if isinstance(t, str) else t.address for t in targets],
        "connect_timeout": "1s",
        "timeout": "1s",
        "max_fails": 2,
        "fail_timeout": "2s",
        "retries": 1,
    }
    cfg.update(overrides)
    return cfg


def route(name, upstream, path=None, prefix=None, methods=None):
    match = {}
    if path is not None:
        match["path"] = path
    if prefix is not None:
        match["prefix"] = prefix
    if methods is not None:
        match["methods"] = list(methods)
    return {"name": name, "match": match, "upstream": upstream}


def gateway_config(upstreams, routes=None, server=None, log=None, metrics=None, **sections):
    """A whole configuration as a dict. `upstreams`: name -> list of targets
    (strings, Upstream or DeadPort objects) or a full upstream dict. `routes`
    defaults to one catch-all route `echo` to the first upstream. server.listen
    is filled in by Gateway.start()."""
    ups = {}
    for name, spec in upstreams.items():
        ups[name] = spec if isinstance(spec, dict) else upstream_config(spec)
    if routes is None:
        routes = [route("echo", next(iter(ups)), prefix="/")]
    cfg = {
        "server": {"workers": 2, "request_timeout": "2s", "read_timeout": "5s", "drain_timeout": "5s"},
        "log": {"level": "info", "format": "json", "access": True},
    }
    cfg["server"].update(server or {})
    cfg["log"].update(log or {})
    if metrics:
        cfg["metrics"] = metrics
    cfg.update(sections)
    cfg["upstreams"] = ups
    cfg["routes"] = routes
    return cfg


# ---------------------------------------------------------------------------
# HTTP helpers. trust_env=False: a proxy from the environment must never see
# loopback test traffic.

def session():
    s = requests.Session()
    s.trust_env = False
    s.verify = False
    return s


def fresh(method, url, **kw):
    """One request on a connection of its own, closed afterwards."""
    kw.setdefault("timeout", 10)
    kw.setdefault("allow_redirects", False)
    with session() as s:
        return s.request(method, url, **kw)


def raw_connect(port, timeout=5.0):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(sock, method="GET"):
    """Read one HTTP response from a connected socket: (status, HTTPMessage, body)."""
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    return resp.status, resp.msg, body


def peer_closed(sock, timeout):
    """True when the peer closes (EOF or reset) within timeout; data read is discarded."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        if not data:
            return True


# ---------------------------------------------------------------------------
# Prometheus text parsing

_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*\Z")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(v):
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


class Metrics:
    """A parsed /metrics page: samples keyed by name and label set, plus # TYPE lines."""

    def __init__(self, text):
        self.text = text
        self.samples = []  # (name, labels dict, value)
        self.types = {}
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 4 and parts[1] == "TYPE":
                    self.types[parts[2]] = parts[3].strip()
                continue
            m = _SAMPLE.match(line)
            assert m, "unparsable metrics line: %r" % line
            labels = {}
            if m.group(3):
                pos = 0
                body = m.group(3)
                while pos < len(body):
                    lm = _LABEL.match(body, pos)
                    assert lm, "unparsable labels in %r" % line
                    labels[lm.group(1)] = _unescape(lm.group(2))
                    pos = lm.end()
            self.samples.append((m.group(1), labels, float(m.group(4))))

    def series(self, name, **labels):
        """Samples of `name` whose labels include `labels`: list of (labels, value)."""
        return [(lab, v) for n, lab, v in self.samples
                if n == name and all(lab.get(k) == str(val) for k, val in labels.items())]

    def get(self, name, **labels):
        """The value of the one series with exactly these labels (None when absent)."""
        want = {k: str(v) for k, v in labels.items()}
        found = [v for n, lab, v in self.samples if n == name and lab == want]
        assert len(found) <= 1, "series %s%s appears %d times" % (name, want, len(found))
        return found[0] if found else None

    def value(self, name, default=0.0, **labels):
        v = self.get(name, **labels)
        return default if v is None else v

    def sum(self, name, **labels):
        return sum(v for _, v in self.series(name, **labels))

    def names(self):
        return {n for n, _, _ in self.samples}


# ---------------------------------------------------------------------------
# The gateway process

class GatewayError(AssertionError):
    pass


class Gateway:
    """One gateway process. `config` is a dict (server.listen is set here) or
    YAML text in which @PORT@ stands for the listening port."""

    def __init__(self, config, scratch=None, name="gateway", env=None, args=(), start_timeout=None):
        self.name = name
        self.config = config
        self.scratch = Path(scratch) if scratch else scratch_dir()
        self.env = dict(os.environ, **(env or {}))
        self.args = list(args)
        self.start_timeout = start_timeout or START_TIMEOUT
        self.config_path = self.scratch / ("%s.yaml" % name)
        self.stdout_path = self.scratch / ("%s.stdout.log" % name)
        self.stderr_path = self.scratch / ("%s.stderr.log" % name)
        self.proc = None
        self.port = None
        self.returncode = None

    # --- configuration ----------------------------------------------------
    @property
    def tls(self):
        if isinstance(self.config, dict):
            return bool(self.config.get("server", {}).get("tls"))
        return bool(re.search(r"^\s+tls:", self.config, re.M))

    @property
    def scheme(self):
        return "https" if self.tls else "http"

    @property
    def metrics_path(self):
        if isinstance(self.config, dict):
            return self.config.get("metrics", {}).get("path", "/metrics")
        return "/metrics"

    def render_config(self, config=None):
        config = self.config if config is None else config
        if isinstance(config, dict):
            config = dict(config)
            config["server"] = dict(config.get("server", {}))
            config["server"]["listen"] = "127.0.0.1:%d" % self.port
            return to_yaml(config)
        return config.replace("@PORT@", str(self.port))

    def write_config(self, config=None):
        """Write `config` (or the current one) to the config file, atomically.
        A new config replaces self.config, so later writes keep it."""
        if config is not None:
            self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(self.render_config())
        os.replace(tmp, self.config_path)

    # --- life cycle -------------------------------------------------------
    def start(self):
        if not os.access(GATEWAY_BIN, os.X_OK):
            raise GatewayError("gateway binary %s is missing or not executable "
                               "(build it, or set GATEWAY_BIN)" % GATEWAY_BIN)
        for attempt in range(3):
            self.port = free_port()
            self.write_config()
            self._spawn()
            try:
                self.wait_live()
                return self
            except GatewayError:
                if self.proc.poll() is not None and "in use" in self.stderr() and attempt < 2:
                    continue  # lost the port race with another process: try another port
                raise
        return self

    def _spawn(self):
        out = open(self.stdout_path, "ab")
        err = open(self.stderr_path, "ab")
        try:
            self.proc = subprocess.Popen([GATEWAY_BIN, "-c", str(self.config_path)] + self.args,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         cwd=str(self.scratch), env=self.env, start_new_session=True)
        finally:
            out.close()
            err.close()
        self.returncode = None
        if self not in ACTIVE:
            ACTIVE.append(self)

    def wait_live(self, timeout=None):
        timeout = timeout or self.start_timeout
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise GatewayError("gateway exited with %s during start-up\n%s"
                                   % (self.proc.returncode, self.logs()))
            try:
                r = fresh("GET", self.url("/live"), timeout=1)
                if r.status_code == 200:
                    return
                last = "status %d" % r.status_code
            except requests.RequestException as e:
                last = repr(e)
            time.sleep(0.05)
        raise GatewayError("gateway did not answer GET /live with 200 within %.0fs (last: %s)\n%s"
                           % (timeout, last, self.logs()))

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self, timeout):
        """Wait for the process to exit; return its exit code, or None at the deadline."""
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def stop(self, timeout=None, sig=signal.SIGTERM):
        """SIGTERM, wait for exit (deadline), then fail unless the exit code is 0
        and stderr holds no sanitizer report. Idempotent."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                if self.wait_exit(timeout or STOP_TIMEOUT) is None:
                    self.proc.kill()
                    self.proc.wait(5)
                    raise GatewayError("gateway did not exit within %.0fs of %s; killed\n%s"
                                       % (timeout or STOP_TIMEOUT, sig.name, self.logs()))
            self.check_exit()
        finally:
            if self in ACTIVE:
                ACTIVE.remove(self)

    def check_exit(self):
        rc = self.proc.poll()
        self.returncode = rc
        err = self.stderr()
        if rc != 0:
            raise GatewayError("gateway exited with code %s (expected 0)\n%s" % (rc, self.logs()))
        marks = [m for m in SANITIZER_MARKS if m in err]
        if marks:
            raise GatewayError("sanitizer report in gateway stderr (%s)\n%s" % (", ".join(marks), self.logs()))

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self in ACTIVE:
            ACTIVE.remove(self)

    # --- talking to it ----------------------------------------------------
    @property
    def base(self):
        return "%s://127.0.0.1:%d" % (self.scheme, self.port)

    def url(self, path="/"):
        return self.base + path

    def metrics(self):
        r = fresh("GET", self.url(self.metrics_path), timeout=5)
        assert r.status_code == 200, "GET %s: %d %r" % (self.metrics_path, r.status_code, r.text[:300])
        return Metrics(r.text)

    def reload_counts(self):
        m = self.metrics()
        return {res: m.value("gateway_config_reloads_total", result=res) for res in ("success", "failure")}

    def reload(self, expect="success", timeout=10):
        """SIGHUP and wait until gateway_config_reloads_total{result=expect} goes up
        by one; the other result must not move. Returns the counts after."""
        before = self.reload_counts()
        self.send_signal(signal.SIGHUP)
        after = wait_until(lambda: (lambda c: c if c[expect] > before[expect] else None)(self.reload_counts()),
                           timeout, "gateway_config_reloads_total{result=%r} after SIGHUP (before: %s)"
                           % (expect, before))
        other = "failure" if expect == "success" else "success"
        assert after[expect] == before[expect] + 1, "reload counted more than once: %s -> %s" % (before, after)
        assert after[other] == before[other], "reload also counted as %s: %s -> %s" % (other, before, after)
        return after

    # --- logs -------------------------------------------------------------
    def stdout(self):
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr(self):
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_log(self):
        """The JSON access-log lines written so far (stdout), parsed. Fails on a line
        that is not a JSON object: stdout holds the access log and nothing else."""
        out = []
        for line in self.stdout().splitlines():
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                raise AssertionError("stdout line is not JSON: %r" % line)
            assert isinstance(doc, dict), "access-log line is not a JSON object: %r" % line
            out.append(doc)
        return out

    def logs(self, tail=150):
        def last(text):
            lines = text.splitlines()
            cut = "... (%d lines cut)\n" % (len(lines) - tail) if len(lines) > tail else ""
            return cut + "\n".join(lines[-tail:])
        return ("---- %s config (%s) ----\n%s---- %s stderr ----\n%s\n---- %s stdout (access log) ----\n%s\n"
                % (self.name, self.config_path, _read(self.config_path), self.name, last(self.stderr()),
                   self.name, last(self.stdout())))

    def summary(self):
        state = "running" if self.running() else "exited %s" % (self.proc.poll() if self.proc else None)
        return "%s pid %s port %s (%s)\n%s" % (self.name, self.proc.pid if self.proc else None,
                                               self.port, state, self.logs())


def _read(path):
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return "(none)\n"


def run_gateway(args, timeout=20, env=None, cwd=None, unset=()):
    """Run the binary to completion (--check, --version): CompletedProcess.
    `env` adds variables to the environment, `unset` removes some."""
    if not os.access(GATEWAY_BIN, os.X_OK):
        raise GatewayError("gateway binary %s is missing or not executable" % GATEWAY_BIN)
    full = {k: v for k, v in os.environ.items() if k not in unset}
    full.update(env or {})
    try:
        return subprocess.run([GATEWAY_BIN] + list(args), capture_output=True, text=True, timeout=timeout,
                              env=full, cwd=cwd, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise AssertionError("gateway %s did not finish within %ss\nstdout: %s\nstderr: %s"
                             % (" ".join(args), timeout, e.stdout, e.stderr))


# ---------------------------------------------------------------------------
# TLS

def make_cert(directory, stem="tls", cn="localhost"):
    """A fresh self-signed EC certificate and key: (cert_path, key_path)."""
    directory = Path(directory)
    cert, key = directory / (stem + ".crt"), directory / (stem + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=" + cn, "-days", "1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def cert_fingerprint_file(cert_path):
    der = ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())
    return hashlib.sha256(der).hexdigest()


def client_context(min_version=None, max_version=None, ciphers=None):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if ciphers:
        ctx.set_ciphers(ciphers)
    if min_version:
        ctx.minimum_version = min_version
    if max_version:
        ctx.maximum_version = max_version
    return ctx


def tls_handshake(port, ctx, timeout=5):
    """Handshake with 127.0.0.1:port: (negotiated version, sha256 of the peer's certificate)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            der = s.getpeercert(binary_form=True)
            return s.version(), hashlib.sha256(der).hexdigest()


def cleanup_dir(path):
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------
# The kernel's view of loopback TCP connections (what the other side saw)

TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
              "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
              "0B": "CLOSING"}


def tcp_sockets(local_port=None, remote_port=None):
    """IPv4 TCP sockets of this network namespace from /proc/net/tcp:
    list of (local_port, remote_port, state name)."""
    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            lport = int(fields[1].split(":")[1], 16)
            rport = int(fields[2].split(":")[1], 16)
            state = TCP_STATES.get(fields[3], fields[3])
            if (local_port is None or lport == local_port) and (remote_port is None or rport == remote_port):
                out.append((lport, rport, state))
    return out


def open_fds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def burst_at_once(url, sessions):
    """One request on each (connected) session at the same instant: the
    threads are started first and released together, so the time measured is
    the burst's, not the threads' start-up. (statuses, start, end)."""
    barrier = threading.Barrier(len(sessions) + 1)

    def one(s):
        barrier.wait(timeout=10)
        return s.get(url, timeout=10).status_code

    with ThreadPoolExecutor(len(sessions)) as pool:
        futures = [pool.submit(one, s) for s in sessions]
        barrier.wait(timeout=10)
        start = time.monotonic()
        statuses = [f.result() for f in futures]
        end = time.monotonic()
    return statuses, start, end
