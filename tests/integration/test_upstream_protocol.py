"""What the gateway does with odd but possible upstream answers: 1xx interim answers
(103 Early Hints, 100 Continue), a body on a HEAD answer, bytes after a complete
answer, chunked answers with extensions and trailers, Content-Length together with
Transfer-Encoding, close-delimited bodies, malformed answers, upstreams that close
after answering; and least_conn balancing and connect_timeout against a target that
never answers SYN.

The upstream here is a raw socket server written in this file (ScriptedUpstream):
each request it reads is passed to a script that returns the exact bytes to send
(and pauses and closes between them), so the gateway sees byte sequences no
well-behaved server library would produce. It counts connections and records
every request with the connection it came on. The rule checked throughout: every
client gets its OWN answer; an answer (or a stray byte of one) is never given to
another request."""

import http.client
import json
import select
import socket
import threading
import time

import pytest

from harness import gateway_config, raw_connect, upstream_config, wait_until

CLOSE = object()  # script action: close the connection (after what was sent)


# ---------------------------------------------------------------------------
# The scripted raw-socket upstream

class SeenRequest:
    __slots__ = ("method", "target", "path", "version", "headers", "body", "conn", "seq", "time")

    def __init__(self, method, target, version, headers, body, conn, seq):
        self.method = method
        self.target = target
        self.path = target.split("?", 1)[0]
        self.version = version
        self.headers = headers  # list of (name, value) as received
        self.body = body
        self.conn = conn
        self.seq = seq  # 0 for the first request on its connection
        self.time = time.monotonic()

    def header(self, name):
        vals = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def __repr__(self):
        return "<%s %s conn=%d seq=%d>" % (self.method, self.target, self.conn, self.seq)


class ScriptedUpstream:
    """Accepts on a free loopback port; for each request calls script(req), which
    returns a list of actions: bytes (sent as one write), a number (pause, seconds;
    cut short by stop()), or CLOSE. After the actions the connection waits for the
    next request."""

    def __init__(self, script, name="scripted"):
        self.script = script
        self.name = name
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.requests = []
        self.connections = 0
        self.open = {}
        self.threads = []
        self.lsock = None
        self.port = None

    def start(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.settimeout(0.05)
        self.port = self.lsock.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name="scripted-accept-" + self.name, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def stop(self):
        self.stop_event.set()
        with self.lock:
            socks = list(self.open.values())
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self.threads):
            t.join(5)
        if self.lsock is not None:
            self.lsock.close()
            self.lsock = None

    # --- what it saw ----------------------------------------------------
    def seen(self, prefix=None):
        with self.lock:
            return [r for r in self.requests if prefix is None or r.path.startswith(prefix)]

    def count(self, prefix=None):
        return len(self.seen(prefix))

    def summary(self):
        with self.lock:
            return "scripted upstream %s on %s: %d connections, requests %s" % (
                self.name, self.port, self.connections, self.requests[-20:])

    # --- serving --------------------------------------------------------
    def _accept_loop(self):
        while not self.stop_event.is_set():
            try:
                sock, _ = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.connections += 1
                cid = self.connections
                self.open[cid] = sock
            t = threading.Thread(target=self._serve, args=(sock, cid), name="scripted-%s-%d" % (self.name, cid),
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _recv(self, sock):
        """Some bytes, b"" at EOF, None when stopping."""
        while not self.stop_event.is_set():
            try:
                return sock.recv(65536)
            except socket.timeout:
                continue
        return None

    def _read_request(self, sock, buf, cid, seq):
        while b"\r\n\r\n" not in buf:
            data = self._recv(sock)
            if not data:
                return None, buf
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
        hmap = {k.lower(): v for k, v in headers}
        body = b""
        if "chunked" in hmap.get("transfer-encoding", "").lower():
            while True:
                while b"\r\n" not in buf:
                    data = self._recv(sock)
                    if not data:
                        return None, buf
                    buf += data
                size_line, buf = buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while b"\r\n\r\n" not in b"\r\n" + buf:
                        data = self._recv(sock)
                        if not data:
                            return None, buf
                        buf += data
                    _, buf = (b"\r\n" + buf).split(b"\r\n\r\n", 1)
                    break
                while len(buf) < size + 2:
                    data = self._recv(sock)
                    if not data:
                        return None, buf
                    buf += data
                body += buf[:size]
                buf = buf[size + 2:]
        else:
            n = int(hmap.get("content-length", "0") or 0)
            while len(buf) < n:
                data = self._recv(sock)
                if not data:
                    return None, buf
                buf += data
            body, buf = buf[:n], buf[n:]
        return SeenRequest(method, target, version, headers, body, cid, seq), buf

    def _serve(self, sock, cid):
        sock.settimeout(0.05)
        buf = b""
        seq = 0
        try:
            while not self.stop_event.is_set():
                req, buf = self._read_request(sock, buf, cid, seq)
                if req is None:
                    return
                seq += 1
                with self.lock:
                    self.requests.append(req)
                for action in self.script(req):
                    if action is CLOSE:
                        return
                    if isinstance(action, (int, float)):
                        if self.stop_event.wait(action):
                            return
                        continue
                    sock.sendall(action)
        except OSError:
            return
        finally:
            with self.lock:
                self.open.pop(cid, None)
            try:
                sock.close()
            except OSError:
                pass


@pytest.fixture
def scripted():
    """Factory: scripted(script, name) -> a started ScriptedUpstream, stopped after the test."""
    made = []

    def make(script, name="scripted"):
        up = ScriptedUpstream(script, name).start()
        made.append(up)
        return up
    try:
        yield make
    finally:
        for up in made:
            up.stop()


def answer(body=b"", status="200 OK", headers=(), length=True):
    """The bytes of one response."""
    if isinstance(body, str):
        body = body.encode()
    head = "HTTP/1.1 %s\r\n" % status
    for k, v in headers:
        head += "%s: %s\r\n" % (k, v)
    if length:
        head += "Content-Length: %d\r\n" % len(body)
    return head.encode() + b"\r\n" + body


def echo_path(req):
    """The default script: 200 whose body is the request's path."""
    return [answer(req.target, headers=[("Content-Type", "text/plain")])]


# ---------------------------------------------------------------------------
# Client helpers: each call is a new client connection.

def call(gw, method, target, body=None, headers=None, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, resp.msg, data
    finally:
        conn.close()


def assert_own_answer(gw, target, method="GET", body=None):
    status, headers, data = call(gw, method, target, body=body)
    assert status == 200, "%s %s: got %d %r; expected 200 with its own path" % (method, target, status, data[:300])
    assert data == target.encode(), "%s %s got someone else's answer or garbage: %r" % (method, target, data[:300])
    return headers


def assert_502_json(status, headers, data, what):
    assert status == 502, "%s: expected 502, got %d %r" % (what, status, data[:300])
    ctype = headers.get("Content-Type") or ""
    assert ctype.startswith("application/json"), "%s: 502 is %r, not JSON: %r" % (what, ctype, data[:200])
    doc = json.loads(data)
    assert doc.get("status") == 502 and doc.get("error"), doc
    assert doc.get("request_id") == headers.get("X-Request-Id"), (doc, headers.get("X-Request-Id"))


def one_worker(up, **overrides):
    """One worker, so sequential clients share one pool of upstream connections."""
    ucfg = upstream_config([up.address], keepalive=4, **overrides)
    return gateway_config({"up": ucfg}, server={"workers": 1})


def assert_gateway_serving(gw, target):
    """/live answers, and a well-behaved request through the same upstream gets its own answer."""
    status, _, data = call(gw, "GET", "/live")
    assert status == 200, "/live: %d %r" % (status, data[:200])
    assert_own_answer(gw, target)


# ---------------------------------------------------------------------------
# 1xx interim answers

@pytest.mark.parametrize("shape", ["one-write", "separate-writes"])
def test_103_early_hints_then_200_own_answer(stack, scripted, shape):
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"

    def script(req):
        final = answer(req.target, headers=[("Content-Type", "text/plain")])
        if shape == "one-write":
            return [hints + final]
        return [hints, 0.05, final]
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    targets = ["/eh/first-client", "/eh/second-client", "/eh/third-client"]
    for t in targets:
        headers = assert_own_answer(gw, t)
        assert headers.get("Link") in (None, "</a>"), headers
    seen = up.seen("/eh/")
    assert [r.path for r in seen] == targets, "upstream saw %s" % seen
    assert len({r.conn for r in seen}) == 1 and up.connections == 1, (
        "the sequential requests did not share one pooled upstream connection (%d connections: %s); "
        "the test needs them to" % (up.connections, seen))


def test_100_continue_then_200(stack, scripted):
    def script(req):
        return [b"HTTP/1.1 100 Continue\r\n\r\n", 0.05, answer(req.target, headers=[("Content-Type", "text/plain")])]
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    status, headers, data = call(gw, "POST", "/cont/post", body=b"payload", headers={"Expect": "100-continue"})
    assert status == 200, "client got %d %r; expected the final 200" % (status, data[:200])
    assert data == b"/cont/post", data[:200]
    status, headers, data = call(gw, "GET", "/cont/get")
    assert status == 200 and data == b"/cont/get", (status, data[:200])
    # And the pooled connection still gives each client its own answer.
    assert_own_answer(gw, "/cont/after")
    assert up.seen("/cont/post")[0].body == b"payload"


# ---------------------------------------------------------------------------
# Answers with more bytes than they should have

def _recv_head(sock, deadline_s=5):
    """Read a response head (through the blank line) from a raw socket; returns (head, extra bytes)."""
    buf = b""
    end = time.monotonic() + deadline_s
    while b"\r\n\r\n" not in buf:
        left = end - time.monotonic()
        assert left > 0, "no complete response head within %ss: %r" % (deadline_s, buf[:300])
        sock.settimeout(left)
        data = sock.recv(65536)
        assert data, "connection closed before the response head was complete: %r" % buf[:300]
        buf += data
    head, extra = buf.split(b"\r\n\r\n", 1)
    return head.decode("latin-1"), extra


def _more_bytes(sock, within):
    """Whatever arrives on sock within `within` seconds (b"" when nothing, or EOF)."""
    got = b""
    end = time.monotonic() + within
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return got
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return got
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return got
        if not data:
            return got
        got += data


@pytest.mark.parametrize("shape", ["body-in-same-write", "body-a-bit-later"])
def test_head_answer_with_body(stack, scripted, shape):
    def script(req):
        if req.method == "HEAD":
            head = answer(b"", headers=[("Content-Type", "text/plain")], length=False)
            head = head.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n", 1)
            return [head + b"hello"] if shape == "body-in-same-write" else [head, 0.1, b"hello"]
        return echo_path(req)
    up = scripted(script)
    gw = stack.gateway(one_worker(up))

    with raw_connect(gw.port) as s:
        s.sendall(b"HEAD /hb/head HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head, extra = _recv_head(s)
        assert head.startswith("HTTP/1.1 200"), head
        extra += _more_bytes(s, 0.5)
        assert extra == b"", "the HEAD client got body bytes after the head: %r" % extra[:200]
        # The same client connection still works.
        s.sendall(b"GET /hb/same-client HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        resp = http.client.HTTPResponse(s, method="GET")
        resp.begin()
        data = resp.read()
        assert resp.status == 200 and data == b"/hb/same-client", (resp.status, data[:200])

    # Another client, then more: each gets its own answer, never "hello" or a 502.
    for t in ("/hb/next-client", "/hb/next-client-2", "/hb/next-client-3"):
        assert_own_answer(gw, t)
    assert up.count("/hb/head") == 1, "the HEAD was sent %d times" % up.count("/hb/head")


@pytest.mark.parametrize("shape", ["same-write", "a-bit-later"])
def test_extra_answer_after_complete_answer_not_delivered(stack, scripted, shape):
    evil = answer(b"EVIL!", headers=[("Content-Type", "text/plain"), ("X-Evil", "1")])

    def script(req):
        own = answer(req.target, headers=[("Content-Type", "text/plain")])
        if req.path.startswith("/xb/doubled"):
            return [own + evil] if shape == "same-write" else [own, 0.1, evil]
        return [own]
    up = scripted(script)
    gw = stack.gateway(one_worker(up))

    for round_ in range(3):
        assert_own_answer(gw, "/xb/doubled-%d" % round_)
        if shape == "a-bit-later":
            time.sleep(0.3)  # let the stray answer arrive while the connection is idle in the pool
        for i in range(3):
            headers = assert_own_answer(gw, "/xb/next-%d-%d" % (round_, i))
            assert headers.get("X-Evil") is None, "the stray answer's headers reached a client"


# ---------------------------------------------------------------------------
# Body framing

def test_chunked_with_extensions_and_trailers(stack, scripted):
    def script(req):
        if req.path.startswith("/ck/trailers"):
            return [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                    b"Trailer: X-Sum\r\n\r\n"
                    b"5;ext=1\r\nhello\r\n"
                    b"6;name=\"quoted value\";flag\r\n world\r\n"
                    b"1 \r\n!\r\n"
                    b"0;last=yes\r\nX-Sum: abc\r\nX-Other: def\r\n\r\n"]
        return echo_path(req)
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    for i in range(3):
        status, headers, data = call(gw, "GET", "/ck/trailers?i=%d" % i)
        assert status == 200, (status, data[:300])
        assert data == b"hello world!", "chunked answer with extensions/trailers arrived as %r" % data[:300]
        assert_own_answer(gw, "/ck/after-%d" % i)


def test_content_length_and_chunked_chunked_wins(stack, scripted):
    def script(req):
        if req.path.startswith("/cl-te/"):
            return [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"]
        return echo_path(req)
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    for i in range(3):
        status, headers, data = call(gw, "GET", "/cl-te/%d" % i)
        assert status == 200, (status, data[:300])
        assert data == b"hello, world", "Content-Length + chunked: client got %r (chunked must win)" % data[:300]
        cl = headers.get("Content-Length")
        assert cl in (None, str(len(data))), "client-side Content-Length %r does not match the body" % cl
        assert_own_answer(gw, "/cl-te-after/%d" % i)


@pytest.mark.parametrize("shape", ["one-write-then-close", "split-then-close"])
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_close_delimited_body(stack, scripted, version, shape):
    """No Content-Length, no Transfer-Encoding: the body ends where the upstream closes.
    The close follows the last bytes at once, as a real server's would."""
    body = b"until-close-" * 500

    def script(req):
        if req.path.startswith("/cd/"):
            head = ("%s 200 OK\r\nContent-Type: text/plain\r\n\r\n" % version).encode()
            if shape == "one-write-then-close":
                return [head + body, CLOSE]
            return [head, body[:3000], 0.05, body[3000:], CLOSE]
        return echo_path(req)
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    for i in range(3):
        status, headers, data = call(gw, "GET", "/cd/%d" % i)
        assert status == 200, (status, data[:300])
        assert data == body, "close-delimited body arrived as %d bytes (expected %d): %r..." % (
            len(data), len(body), data[:100])
        assert_own_answer(gw, "/cd-after/%d" % i)


# ---------------------------------------------------------------------------
# Malformed answers

MALFORMED = {
    "status-not-a-number": b"HTTP/1.1 abc\r\n\r\n",
    "not-http": b"hello there\r\n\r\n",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello",
    "conflicting-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nNo colon here\r\nContent-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_answer_502_and_still_serving(stack, scripted, kind):
    def script(req):
        if req.path.startswith("/bad/"):
            return [MALFORMED[kind], 0.2, CLOSE]
        return echo_path(req)
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    for i, method in enumerate(["GET", "POST", "GET"]):
        t0 = time.monotonic()
        status, headers, data = call(gw, method, "/bad/%d" % i, body=b"x" if method == "POST" else None)
        dt = time.monotonic() - t0
        assert_502_json(status, headers, data, "%s of a %s answer" % (method, kind))
        assert dt < 0.9, "the 502 for a %s answer took %.2fs (upstream timeout is 1s): it should not wait" % (
            kind, dt)
        assert_gateway_serving(gw, "/bad-after/%d" % i)


# ---------------------------------------------------------------------------
# Upstreams closing after the answer

def test_upstream_connection_close_after_answer(stack, scripted):
    def script(req):
        return [answer(req.target, headers=[("Content-Type", "text/plain"), ("Connection", "close")]), CLOSE]
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    try:
        for i in range(10):
            method = "POST" if i % 2 else "GET"
            target = "/cc/%s-%d" % (method.lower(), i)
            conn.request(method, target, body=b"b" if method == "POST" else None)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 200 and data == target.encode(), "%s %s: %d %r" % (
                method, target, resp.status, data[:200])
    finally:
        conn.close()
    assert up.count("/cc/") == 10, "upstream saw %s" % up.seen("/cc/")
    assert up.connections == 10, "each answer closed its connection; %d connections for 10 requests" % up.connections


def test_upstream_silent_close_after_answer(stack, scripted):
    """No Connection: close, the upstream just closes right after each answer. The
    gateway has had time to see the close before the next request (50 ms), so no
    request, not even a POST, may fail on the dead pooled connection."""
    def script(req):
        return [answer(req.target, headers=[("Content-Type", "text/plain")]), CLOSE]
    up = scripted(script)
    gw = stack.gateway(one_worker(up))
    for i in range(10):
        method = "POST" if i % 2 else "GET"
        target = "/sc/%s-%d" % (method.lower(), i)
        status, _, data = call(gw, method, target, body=b"b" if method == "POST" else None)
        assert status == 200 and data == target.encode(), "%s %s after a silent close: %d %r" % (
            method, target, status, data[:200])
        time.sleep(0.05)
    posts = [r for r in up.seen("/sc/") if r.method == "POST"]
    assert len(posts) == 5, "POSTs reached the upstream %d times for 5 requests" % len(posts)


# ---------------------------------------------------------------------------
# least_conn

def test_least_conn_prefers_fast_target(stack, scripted):
    def slow_script(req):
        return [0.3, answer(b"slow", headers=[("Content-Type", "text/plain")])]

    def fast_script(req):
        return [answer(b"fast", headers=[("Content-Type", "text/plain")])]
    slow = scripted(slow_script, "slow")
    fast = scripted(fast_script, "fast")
    # The slow target first: on a tie the first target may be picked, which only helps it.
    ucfg = upstream_config([slow.address, fast.address], balance="least_conn", keepalive=16, timeout="3s",
                           max_fails=100)
    gw = stack.gateway(gateway_config({"up": ucfg}, server={"workers": 1, "request_timeout": "5s"}))

    stop_at = time.monotonic() + 2.0
    results = []
    lock = threading.Lock()

    def client(n):
        while time.monotonic() < stop_at:
            status, _, data = call(gw, "GET", "/lc/%d" % n)
            with lock:
                results.append((status, data))
    threads = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads), "clients did not finish"
    bad = [r for r in results if r[0] != 200]
    assert not bad, "failed requests: %s" % bad[:5]
    n_slow, n_fast = slow.count("/lc/"), fast.count("/lc/")
    assert n_fast + n_slow == len(results)
    assert n_fast >= 5 * max(n_slow, 1), (
        "least_conn: fast target got %d requests, slow (300 ms) target %d; the fast one should get most"
        % (n_fast, n_slow))


# ---------------------------------------------------------------------------
# connect_timeout against a target that never answers SYN

class Blackhole:
    """A loopback listener with backlog 0 whose accept queue is filled and never
    drained: further SYNs are dropped, so a connect to it hangs."""

    def __init__(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(0)
        self.port = self.lsock.getsockname()[1]
        self.fillers = []

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def fill(self):
        """Connect until a connect does not complete; True when the port now black-holes."""
        for _ in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            self.fillers.append(s)
            s.connect_ex(("127.0.0.1", self.port))
            _, w, _ = select.select([], [s], [], 0.3)
            if not w:
                return self.probe()
        return False

    def probe(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(0.5)
        try:
            s.connect(("127.0.0.1", self.port))
            return False
        except socket.timeout:
            return True
        except OSError:
            return False
        finally:
            s.close()

    def close(self):
        for s in self.fillers:
            s.close()
        self.fillers = []
        self.lsock.close()


@pytest.fixture
def blackhole():
    b = Blackhole()
    try:
        yield b
    finally:
        b.close()


def test_connect_timeout_blackholed_target(stack, blackhole):
    if not blackhole.fill():
        pytest.skip("this kernel does not drop SYNs to a listener with a full accept queue; "
                    "cannot make a black-holed loopback target")
    ucfg = upstream_config([blackhole.address], connect_timeout="500ms", timeout="5s", retries=0)
    gw = stack.gateway(gateway_config({"up": ucfg}, server={"request_timeout": "10s"}))
    for method in ("GET", "POST"):
        t0 = time.monotonic()
        status, headers, data = call(gw, method, "/bh/x", body=b"x" if method == "POST" else None, timeout=15)
        dt = time.monotonic() - t0
        assert status in (504, 502), "%s to a black-holed target: %d %r" % (method, status, data[:200])
        assert (headers.get("Content-Type") or "").startswith("application/json"), data[:200]
        assert 0.45 <= dt <= 1.5, (
            "%s: %d after %.2fs; connect_timeout is 0.5s (timeout 5s, request_timeout 10s)" % (method, status, dt))
    status, _, _ = call(gw, "GET", "/live")
    assert status == 200
    wait_until(lambda: blackhole.probe(), 2, "the target still black-holes (control)")
