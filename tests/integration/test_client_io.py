"""Client-side I/O and request hygiene: a client that half-closes after its request,
a client that never reads its (large) answer, a client that pipelines a long burst
of requests, a PUT retried after a stale keep-alive upstream connection, an
upstream answer with mixed line endings, requests whose request-target or header
names could smuggle something past an upstream, and a chunked answer whose chunk
size is spelled "0x5".

The odd upstreams are the raw-socket ScriptedUpstream of test_upstream_protocol.py
(reused, not copied); RecordingUpstream below also keeps every byte it received,
so "the upstream saw nothing" does not depend on how a server library would parse
a malformed request. Every wait is bounded by a deadline; every gateway and
upstream is stopped by its fixture, even when the test fails, and the gateway must
exit 0 without a sanitizer report (see harness.Gateway.stop)."""

import http.client
import json
import os
import socket
import threading
import time

import pytest

import harness
from harness import gateway_config, raw_connect, tcp_sockets, upstream_config
from test_upstream_protocol import (CLOSE, ScriptedUpstream, answer, assert_502_json, assert_gateway_serving,
                                    assert_own_answer, call, echo_path, one_worker)

HOST = b"Host: 127.0.0.1\r\n"


# ---------------------------------------------------------------------------
# Upstreams and fixtures

class RecordingUpstream(ScriptedUpstream):
    """A ScriptedUpstream that also keeps every byte it received, on any connection."""

    def __init__(self, script, name="recording"):
        super().__init__(script, name)
        self.raw = bytearray()

    def _recv(self, sock):
        data = super()._recv(sock)
        if data:
            with self.lock:
                self.raw += data
        return data

    def received(self):
        with self.lock:
            return bytes(self.raw)


@pytest.fixture
def raw_upstream():
    """Factory: raw_upstream(script, name, cls) -> a started scripted upstream, stopped after the test."""
    made = []

    def make(script, name="scripted", cls=ScriptedUpstream):
        up = cls(script, name).start()
        made.append(up)
        return up
    try:
        yield make
    finally:
        for up in made:
            up.stop()


# ---------------------------------------------------------------------------
# Raw client helpers

def read_until_closed(sock, timeout):
    """Read until the peer closes or the deadline: (bytes, how) with how in
    "eof", "reset", "timeout"."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), "timeout"
        sock.settimeout(left)
        try:
            got = sock.recv(1 << 20)
        except socket.timeout:
            return bytes(data), "timeout"
        except (ConnectionResetError, BrokenPipeError):
            return bytes(data), "reset"
        if not got:
            return bytes(data), "eof"
        data += got


def parse_responses(buf, pos=0, eof=False):
    """The complete HTTP/1.1 responses in buf from pos: ([(status, headers, body)], next pos).
    headers: dict of lower-cased name -> value. Knows Content-Length, chunked, and
    (with eof) close-delimited bodies."""
    out = []
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return out, pos
        lines = bytes(buf[pos:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        assert len(parts) >= 2 and parts[0].startswith("HTTP/1.") and parts[1].isdigit(), (
            "not a status line: %r (at offset %d)" % (lines[0], pos))
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        body_at = end + 4
        if status < 200 or status in (204, 304):
            body, nxt = b"", body_at
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body, p = bytearray(), body_at
            while True:
                le = buf.find(b"\r\n", p)
                if le < 0:
                    return out, pos
                size = int(bytes(buf[p:le]).split(b";")[0].strip(), 16)
                if size == 0:
                    te = buf.find(b"\r\n\r\n", le)
                    if te < 0 and buf[le:le + 4] != b"\r\n\r\n":
                        return out, pos
                    nxt = (te if te >= 0 else le) + 4
                    break
                if len(buf) < le + 2 + size + 2:
                    return out, pos
                body += buf[le + 2:le + 2 + size]
                p = le + 2 + size + 2
            body = bytes(body)
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if len(buf) < body_at + n:
                return out, pos
            body, nxt = bytes(buf[body_at:body_at + n]), body_at + n
        else:
            if not eof:
                return out, pos
            body, nxt = bytes(buf[body_at:]), len(buf)
        out.append((status, headers, body))
        pos = nxt


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/%d/status" % pid)


def timed_get(gw, target, timeout=5):
    """One GET on a fresh connection: (status, body, seconds)."""
    t0 = time.monotonic()
    status, _, data = call(gw, "GET", target, timeout=timeout)
    return status, data, time.monotonic() - t0


# ---------------------------------------------------------------------------
# 1. A client that half-closes (shutdown(SHUT_WR)) after its request(s)

HALF_CLOSE_SHAPES = {
    "one-request": ["/hc/delay/200"],
    "three-pipelined": ["/hc/delay/200", "/hc/echo?i=1", "/hc/delay/100"],
}


@pytest.mark.parametrize("shape", sorted(HALF_CLOSE_SHAPES))
def test_half_closed_client_gets_complete_answer(stack, shape):
    targets = HALF_CLOSE_SHAPES[shape]
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}))
    with raw_connect(gw.port) as s:
        s.sendall(b"".join(b"GET %s HTTP/1.1\r\n%s\r\n" % (t.encode(), HOST) for t in targets))
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        data, how = read_until_closed(s, 5)
        dt = time.monotonic() - t0
    responses, rest = parse_responses(data, eof=True)
    got = [(st, json.loads(body).get("path") if st == 200 else body[:200]) for st, _, body in responses]
    want = [(200, t.split("?")[0]) for t in targets]
    assert got == want, (
        "half-closed client (%s): got %s (connection %s after %.2fs, %d bytes); expected %s"
        % (shape, got, how, dt, len(data), want))
    assert rest == len(data), "bytes after the answers: %r" % data[rest:rest + 200]
    assert how in ("eof", "reset"), (
        "the gateway answered but kept the half-closed connection open for %.1fs" % dt)
    assert dt < 3, "the half-closed connection was closed only after %.2fs" % dt
    assert [r.path for r in up.seen(prefix="/hc/")] == [t.split("?")[0] for t in targets], up.seen()
    # Still serving; the harness then checks exit 0 and no sanitizer report at stop.
    status, _, _ = call(gw, "GET", "/live")
    assert status == 200


# ---------------------------------------------------------------------------
# 2. A client that sends its request and never reads the answer

def test_client_never_reading_is_disconnected_after_read_timeout(stack):
    up = stack.upstream()
    size = 20_000_000
    # request_timeout and the upstream timeout are long: only read_timeout (1s) may end it.
    ucfg = upstream_config([up], timeout="5s")
    gw = stack.gateway(gateway_config({"up": ucfg}, server={"read_timeout": "1s", "request_timeout": "30s"}))
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.settimeout(5)
        s.connect(("127.0.0.1", gw.port))
        cport = s.getsockname()[1]
        t0 = time.monotonic()
        s.sendall(b"GET /nr/big/%d HTTP/1.1\r\n%s\r\n" % (size, HOST))

        def gateway_side():
            """States of the gateway's end of this connection ([] once it is gone)."""
            return [st for _, _, st in tcp_sockets(local_port=gw.port, remote_port=cport)]

        closed_after = None
        probes = []
        next_probe = 0.0
        while time.monotonic() - t0 < 8:
            states = gateway_side()
            if all(st != "ESTABLISHED" for st in states):
                closed_after = time.monotonic() - t0
                break
            if time.monotonic() >= next_probe:
                # Meanwhile others are served, promptly.
                for target in ("/live", "/nr/echo?probe=%d" % len(probes)):
                    status, data, dt = timed_get(gw, target)
                    probes.append((target, status, round(dt, 3)))
                    assert status == 200 and dt < 1.0, (
                        "while a client is not reading, GET %s: %d after %.2fs (%r)" % (target, status, dt, data[:200]))
                next_probe = time.monotonic() + 0.5
            time.sleep(0.02)
        assert up.count(prefix="/nr/big/") == 1, "the big request never reached the upstream: %s" % up.seen()
        assert closed_after is not None, (
            "a client that never reads was not disconnected within 8s (read_timeout 1s); gateway side "
            "of the connection: %s" % gateway_side())
        assert closed_after >= 0.8, (
            "the non-reading client was cut after only %.2fs, before read_timeout (1s)" % closed_after)
        assert probes, "no probe ran while the non-reading client was connected"
        # What did the client get? The start of the 200, cut short (not a whole 20 MB body, not an error).
        data, how = read_until_closed(s, 5)
        assert how in ("eof", "reset"), "after the gateway closed, the client still saw no end (%d bytes)" % len(data)
        assert data[:12] == b"HTTP/1.1 200", "the non-reading client was sent %r" % data[:200]
        assert len(data) < size, "the client got the whole answer (%d bytes): it was not cut off" % len(data)
    finally:
        s.close()
    status, _, data = call(gw, "GET", "/nr/echo?after=1")
    assert status == 200, (status, data[:200])


# ---------------------------------------------------------------------------
# 3. One client pipelines a long burst; others must still be served promptly

PIPELINED = b"GET /live HTTP/1.1\r\n" + HOST + b"\r\n"
LIVE_BODY = b'{"status":"live"}\n'
# "long": a backlog that takes the gateway about two seconds to work through (a
# sanitizer build is about four times slower, and gets a shorter one), so that a
# gateway serving it without going back to poll its other sockets keeps the
# others waiting for seconds.
BURSTS = {"20k": (20000, 20000), "long": (400000, 150000)}


def sanitized_build():
    """GATEWAY_SANITIZED is set, or the binary carries a sanitizer runtime."""
    if os.environ.get("GATEWAY_SANITIZED"):
        return True
    try:
        with open(harness.GATEWAY_BIN, "rb") as f:
            image = f.read()
    except OSError:
        return False
    return any(mark in image for mark in (b"__asan_init", b"__tsan_init", b"__ubsan_handle"))


class Prober:
    """A thread that GETs `target` on fresh connections, one after the other, until
    stopped: records (time since t0, status, seconds) per GET."""

    def __init__(self, gw, target, t0, on_each=None):
        self.gw, self.target, self.t0, self.on_each = gw, target, t0, on_each
        self.results = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prober " + target, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            sep = "&" if "?" in self.target else "?"
            t = time.monotonic()
            try:
                status, _, dt = timed_get(self.gw, "%s%si=%d" % (self.target, sep, len(self.results)))
            except OSError as e:
                status, dt = repr(e), time.monotonic() - t
            self.results.append((round(t - self.t0, 2), status, round(dt, 3)))
            if self.on_each:
                self.on_each()
            self.stop.wait(0.02)

    def start(self):
        self.thread.start()
        return self

    def finish(self):
        self.stop.set()
        self.thread.join(10)
        return self.results

    def bad(self):
        return [r for r in self.results if r[1] != 200 or r[2] >= 1.0]


@pytest.mark.parametrize("burst", sorted(BURSTS))
def test_pipelined_burst_does_not_starve_others_and_memory_stays_bounded(stack, burst):
    """One worker. Client A writes a burst of pipelined GET /live (big sends, from a
    thread: a gateway that stops reading makes them block) and reads nothing for a
    while; then it reads everything back as fast as it can, so that the gateway has
    a backlog of requests and nothing stopping it from writing the answers. All
    along, clients on other connections GET a proxied route and /live: each answer
    must come in under a second; the gateway's RSS must stay under 300 MB; and A
    must get one 200 per request, in a connection that stays usable."""
    n, per_send = BURSTS[burst][1 if sanitized_build() else 0], 5000
    up = stack.upstream()
    # ASan keeps freed memory in a quarantine (256 MB by default) that counts in
    # RSS: keep it small here, so that RSS measures the gateway's own buffering.
    asan = ":".join(x for x in (os.environ.get("ASAN_OPTIONS"), "quarantine_size_mb=16") if x)
    gw = stack.gateway(gateway_config({"up": [up]}, server={"workers": 1}), env={"ASAN_OPTIONS": asan})
    rss_before = rss_kb(gw.pid)
    rss_max = [rss_before]

    def rss_sample():
        try:
            rss_max[0] = max(rss_max[0], rss_kb(gw.pid))
        except (OSError, ValueError):
            pass

    blaster = raw_connect(gw.port, timeout=30)
    sent = [0]
    send_error = []

    def send_all():
        try:
            while sent[0] < n:
                blaster.sendall(PIPELINED * min(per_send, n - sent[0]))
                sent[0] += min(per_send, n - sent[0])
        except OSError as e:
            send_error.append(e)
    got = bytearray()
    read_end = []

    def read_all():
        """Read until n answers are in, EOF or an error. The answers are counted by
        their status lines (a /live body holds none)."""
        count = 0
        try:
            while True:
                data = blaster.recv(1 << 20)
                if not data:
                    read_end.append("eof")
                    return
                before = len(got)
                got.extend(data)
                count += got.count(b"HTTP/1.1 ", max(0, before - 8))
                if count >= n and got.endswith(LIVE_BODY):
                    read_end.append("all")
                    return
        except OSError as e:
            read_end.append(repr(e))
    sender = threading.Thread(target=send_all, name="pipeline-sender", daemon=True)
    reader = threading.Thread(target=read_all, name="pipeline-reader", daemon=True)
    t0 = time.monotonic()
    probers = []
    try:
        sender.start()
        # Phase 1: A does not read.
        phase1 = [Prober(gw, "/pl/echo?phase=1", t0, rss_sample).start(), Prober(gw, "/live", t0).start()]
        probers += phase1
        time.sleep(1.0)
        for p in phase1:
            p.finish()
        sent_before_reading = sent[0]
        # Phase 2: A reads everything back; the others go on.
        phase2 = [Prober(gw, "/pl/echo?phase=2", t0, rss_sample).start(), Prober(gw, "/live", t0).start()]
        probers += phase2
        t_read = time.monotonic()
        reader.start()
        reader.join(25)
        read_time = time.monotonic() - t_read
        for p in phase2:
            p.finish()
        sender.join(5)

        report = "; ".join("%s phase %d: %d GETs, slowest %.3fs" % (
            p.target, 1 + (p in phase2), len(p.results), max([r[2] for r in p.results] or [0])) for p in probers)
        for phase, ps in ((1, phase1), (2, phase2)):
            for p in ps:
                assert p.results, "no GET %s ran in phase %d (%s)" % (p.target, phase, report)
                bad = p.bad()
                assert not bad, (
                    "phase %d (%s): %d of %d GETs %s on other connections were slow (>= 1s) or failed "
                    "(time, status, seconds): %s\n(A pipelined %d requests; %d sent before it read; it read "
                    "for %.1fs; %s)" % (phase, "A not reading" if phase == 1 else "A reading its answers back",
                                        len(bad), len(p.results), p.target, bad[:6], n, sent_before_reading,
                                        read_time, report))
        assert rss_max[0] < 300 * 1024, "gateway RSS reached %d MB during the burst (before: %d MB)" % (
            rss_max[0] // 1024, rss_before // 1024)
        assert not send_error and sent[0] == n, "the burst was not all sent: %d of %d (%r)" % (
            sent[0], n, send_error)
        answers, ok = got.count(b"HTTP/1.1 "), got.count(b"HTTP/1.1 200 ")
        assert answers == n and ok == n, (
            "A got %d answers (%d of them 200) for %d pipelined requests in %.1fs of reading (reader: %s)"
            % (answers, ok, n, read_time, read_end or "still reading"))
        # The connection is still usable.
        blaster.settimeout(5)
        blaster.sendall(b"GET /pl/echo?last=1 HTTP/1.1\r\n%s\r\n" % HOST)
        resp = http.client.HTTPResponse(blaster, method="GET")
        resp.begin()
        body = resp.read()
        assert resp.status == 200 and json.loads(body)["query"] == "last=1", (resp.status, body[:200])
    finally:
        for p in probers:
            p.finish()
        try:
            blaster.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        blaster.close()
        sender.join(5)
        reader.join(5)


# ---------------------------------------------------------------------------
# 4. A stale keep-alive connection: the retry on a fresh one must carry the body

@pytest.mark.parametrize("retries", [0, 1])
def test_stale_keepalive_retry_keeps_request_body(stack, raw_upstream, retries):
    def script(req):
        if req.seq == 0:
            return [answer("len=%d" % len(req.body), headers=[("Content-Type", "text/plain")])]
        return [CLOSE]  # the next request on a connection: close without answering
    up = raw_upstream(script, "stale")
    gw = stack.gateway(gateway_config({"up": upstream_config([up.address], keepalive=4, retries=retries)},
                                      server={"workers": 1}))
    for i in range(3):
        t0 = time.monotonic()
        status, _, data = call(gw, "PUT", "/stale/%d" % i, body=b"hello")
        dt = time.monotonic() - t0
        assert status == 200 and data == b"len=5", (
            "PUT #%d with a 5-byte body (after %.2fs): %d %r; upstream saw %s"
            % (i + 1, dt, status, data[:200],
               [(r, r.header("Content-Length"), r.body) for r in up.seen("/stale/")]))
    seen = up.seen("/stale/")
    assert any(r.seq >= 1 for r in seen), (
        "the gateway never reused a pooled connection, so no stale retry happened (%s); the test needs it" % seen)
    for r in seen:
        assert r.header("Content-Length") == "5" and r.body == b"hello", (
            "upstream saw %r with Content-Length %r and body %r" % (r, r.header("Content-Length"), r.body))
    answered = [r for r in seen if r.seq == 0]
    assert [r.path for r in answered] == ["/stale/0", "/stale/1", "/stale/2"], seen


# ---------------------------------------------------------------------------
# 5. An upstream answer with mixed line endings in its head

def test_upstream_answer_with_mixed_line_endings(stack, raw_upstream):
    mixed = b"HTTP/1.1 200 OK\nContent-Length: 10\n\r\nab\r\n\r\ncdef"

    def script(req):
        return [mixed] if req.path.startswith("/mixed/") else echo_path(req)
    up = raw_upstream(script, "mixed")
    gw = stack.gateway(one_worker(up))
    for i in range(2):
        t0 = time.monotonic()
        status, _, data = call(gw, "GET", "/mixed/%d" % i)
        dt = time.monotonic() - t0
        assert status == 200 and data == b"ab\r\n\r\ncdef", (
            "mixed line endings: %d %r after %.2fs; expected 200 b'ab\\r\\n\\r\\ncdef'" % (status, data[:200], dt))
        assert dt < 1.0, "the answer took %.2fs (upstream timeout is 1s)" % dt
        assert_own_answer(gw, "/mixed-after/%d" % i)
    assert up.count("/mixed/") == 2, up.seen()


# ---------------------------------------------------------------------------
# 6. Requests that could smuggle something past an upstream

SMUGGLE = {
    "target-bare-cr": b"GET /a\rb HTTP/1.1\r\n" + HOST + b"\r\n",
    "target-space": b"GET /a b HTTP/1.1\r\n" + HOST + b"\r\n",
    "target-space-cr-te": b"GET /a b\rTransfer-Encoding: chunked HTTP/1.1\r\n" + HOST + b"\r\n",
    "te-space-before-colon": (b"POST /sm HTTP/1.1\r\n" + HOST + b"Transfer-Encoding : chunked\r\n"
                              b"Content-Length: 3\r\n\r\nabc"),
    "te-tab-before-colon": (b"POST /sm HTTP/1.1\r\n" + HOST + b"Transfer-Encoding\t: chunked\r\n"
                            b"Content-Length: 3\r\n\r\nabc"),
    "cl-space-before-colon": b"GET /sm HTTP/1.1\r\n" + HOST + b"Content-Length : 40\r\n\r\n",
    "name-with-space": b"GET /sm HTTP/1.1\r\n" + HOST + b"Bad Name: v\r\n\r\n",
    "name-illegal-chars": b"GET /sm HTTP/1.1\r\n" + HOST + b"X-Bad(name)@: v\r\n\r\n",
    "name-non-ascii": b"GET /sm HTTP/1.1\r\n" + HOST + b"X-\xffName: v\r\n\r\n",
    "name-empty": b"GET /sm HTTP/1.1\r\n" + HOST + b": empty\r\n\r\n",
}


def client_outcome(port, raw, timeout=3):
    """Send raw bytes on a new connection: ("answer", status, head bytes), ("closed", how, bytes) or
    ("nothing", None, b"") when neither an answer nor a close came within timeout."""
    with raw_connect(port) as s:
        s.sendall(raw)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\r\n\r\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return ("nothing", None, buf)
            s.settimeout(left)
            try:
                got = s.recv(65536)
            except socket.timeout:
                return ("nothing", None, buf)
            except (ConnectionResetError, BrokenPipeError):
                return ("closed", "reset", buf)
            if not got:
                return ("closed", "eof", buf)
            buf += got
        line = buf.split(b"\r\n", 1)[0].split(b" ")
        return ("answer", int(line[1]) if len(line) > 1 and line[1].isdigit() else None, buf)


def _quiet(up, within):
    """b"" when the upstream received nothing within `within` seconds, else what it received."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if up.received():
            return up.received()
        time.sleep(0.02)
    return up.received()


@pytest.mark.parametrize("kind", sorted(SMUGGLE))
def test_smuggling_shaped_request_rejected_and_not_forwarded(stack, raw_upstream, kind):
    up = raw_upstream(echo_path, "recording", cls=RecordingUpstream)
    gw = stack.gateway(one_worker(up))
    what, status, head = client_outcome(gw.port, SMUGGLE[kind])
    forwarded = _quiet(up, 0.3)
    assert (what == "answer" and status == 400) or what == "closed", (
        "%s: expected 400 or the connection closed; got %s %s %r" % (kind, what, status, head[:300]))
    assert forwarded == b"" and up.connections == 0, (
        "%s: the upstream received %d bytes over %d connection(s): %r"
        % (kind, len(forwarded), up.connections, forwarded[:400]))
    # Control: a clean request is forwarded (and recorded) as usual.
    assert_gateway_serving(gw, "/sm-control")
    assert b"GET /sm-control " in up.received(), up.received()[:400]


def test_bare_cr_in_header_value_not_forwarded(stack, raw_upstream):
    """RFC 9112 5.2: a bare CR in a field value is rejected, or replaced by SP before
    the message is passed on. Either way the upstream never sees a bare CR."""
    up = raw_upstream(echo_path, "recording", cls=RecordingUpstream)
    gw = stack.gateway(one_worker(up))
    what, status, head = client_outcome(gw.port, b"GET /cr-value HTTP/1.1\r\n" + HOST + b"X-A: a\rb\r\n\r\n")
    forwarded = _quiet(up, 0.3)
    bare_cr = forwarded.replace(b"\r\n", b"").count(b"\r")
    if forwarded:
        assert bare_cr == 0, "a bare CR in a header value reached the upstream: %r" % forwarded[:400]
        assert what == "answer" and status == 200, (what, status, head[:300])
    else:
        assert (what == "answer" and status == 400) or what == "closed", (
            "bare CR in a header value: %s %s %r" % (what, status, head[:300]))
    assert_gateway_serving(gw, "/cr-control")


# ---------------------------------------------------------------------------
# 7. A chunk size with a "0x" prefix is malformed

@pytest.mark.parametrize("size", ["0x5", "0X5"])
def test_chunk_size_with_0x_prefix_is_502(stack, raw_upstream, size):
    bad = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n"
           + size.encode() + b"\r\nhello\r\n0\r\n\r\n")

    def script(req):
        return [bad, 0.2, CLOSE] if req.path.startswith("/hex/") else echo_path(req)
    up = raw_upstream(script, "hex")
    gw = stack.gateway(one_worker(up))
    for i in range(2):
        t0 = time.monotonic()
        status, headers, data = call(gw, "GET", "/hex/%d" % i)
        dt = time.monotonic() - t0
        assert data != b"hello", "chunk size %r was accepted as 5: %d %r" % (size, status, data)
        assert_502_json(status, headers, data, "chunk size %r" % size)
        assert dt < 0.9, "the 502 took %.2fs (upstream timeout 1s): it should not wait" % dt
        assert_gateway_serving(gw, "/hex-after/%d" % i)
