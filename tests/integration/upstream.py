"""A test upstream server: echoes, delays, fails and counts what it saw.

The integration tests put this server behind the gateway and then assert on two
sides: what the client got, and what this server saw (request counts per path and
method, TCP connections accepted, the headers and body of each request). It runs
in the test process on a background thread (ThreadingHTTPServer, HTTP/1.1 with
keep-alive), on a free loopback port, and is stopped by the fixture that made it.

Endpoints (any method; anything not listed below echoes). Each is recognised at
the end of the path, whatever comes before it (/p/status/201 is /status/201), so
the tests can put any route prefix in front:
  /echo...            200 JSON {server, method, path, query, headers, body,
                      body_len, body_sha256, conn}; ?delay_ms=N waits first
  /status/<code>      that status with a small JSON body (none for 1xx/204/304);
                      3xx carry Location: /echo
  /delay/<ms>         waits, then answers like /echo
  /chunked?n=N        200 with Transfer-Encoding: chunked, N chunks (default 5)
  /big/<bytes>        that many bytes of a deterministic pattern (big_body())
  /headers?K=V&K=V    200, every query pair sent back as a response header
  /close              200 JSON, then closes the connection (Connection: close)
  /reset              closes the connection with an RST, answering nothing
  /respond?...        a body and headers of the test's choosing (respond_body()):
                      size=N bytes (default 0) of kind=json (compressible,
                      JSON-like) or kind=random (incompressible), seed=S;
                      ct=<Content-Type> (default application/json; ct= with an
                      empty value sends none); status=<code> (default 200; no
                      body for 1xx/204/304); h=Name:Value, repeatable, each an
                      extra response header; gzip=1 sends the gzip of that body
                      (add h=Content-Encoding:gzip yourself); chunked=1 sends it
                      with Transfer-Encoding: chunked in pieces of piece=N bytes
                      (default 4096)
  /answer/<name>      what the test last chose with set_answer(name, ...): a
                      status, headers, body and delay it may change between
                      requests (404 JSON until it is set)

Header names in `headers` are lower-cased; each value is a list (repeated
headers keep every value, in order).
"""

import functools
import gzip
import hashlib
import json
import random
import re
import socket
import socketserver
import struct
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNKS = ["alpha-", "bravo-", "charlie-", "delta-", "echo-", "foxtrot-", "golf-", "hotel-"]


def big_body(n):
    """The deterministic body /big/<n> answers (and tests may upload)."""
    return random.Random(n).randbytes(n)


def chunked_body(n=5):
    """The body /chunked?n=N answers, once the chunks are put together."""
    return "".join(CHUNKS[i % len(CHUNKS)] + str(i) + ";" for i in range(n)).encode()


_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
          "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]


@functools.lru_cache(maxsize=64)
def respond_body(size, kind="json", seed=0):
    """The body /respond?size=N&kind=K&seed=S answers (before any gzip=1): exactly
    `size` bytes. kind "json": JSON-like records with random numbers, words and hex
    (compresses to roughly a third, not trivially); kind "random": random bytes
    (does not compress). Deterministic, cached."""
    rnd = random.Random("%s-%d-%d" % (kind, size, seed))
    if kind == "random":
        return rnd.randbytes(size)
    assert kind == "json", "kind must be json or random"
    out = []
    have = 1
    i = 0
    while have < size:
        rec = '{"id":%d,"name":"%s-%s","score":%d.%02d,"hex":"%08x","tags":["%s","%s"],"ok":%s}' % (
            i, rnd.choice(_WORDS), rnd.choice(_WORDS), rnd.randrange(1000), rnd.randrange(100),
            rnd.getrandbits(32), rnd.choice(_WORDS), rnd.choice(_WORDS), rnd.choice(("true", "false")))
        out.append(rec)
        have += len(rec) + 1
        i += 1
    return ("[" + ",".join(out) + "]").encode()[:size]


@functools.lru_cache(maxsize=16)
def respond_body_gzipped(size, kind="json", seed=0):
    """What /respond?...&gzip=1 sends: gzip of respond_body(size, kind, seed)."""
    return gzip.compress(respond_body(size, kind, seed), compresslevel=6, mtime=0)


class Request:
    """One request as this server saw it."""

    __slots__ = ("method", "target", "path", "query", "headers", "body", "conn", "time")

    def __init__(self, method, target, headers, body, conn):
        parts = urllib.parse.urlsplit(target)
        self.method = method
        self.target = target
        self.path = parts.path
        self.query = parts.query
        self.headers = headers  # dict: lower-cased name -> list of values
        self.body = body
        self.conn = conn
        self.time = time.monotonic()

    def header(self, name):
        """The single value of a header, or None; values of a repeated header joined by ', '."""
        values = self.headers.get(name.lower())
        return None if values is None else ", ".join(values)

    def __repr__(self):
        return "<%s %s conn=%d>" % (self.method, self.target, self.conn)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def server_bind(self):
        # HTTPServer.server_bind() calls getfqdn(), which may wait on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def process_request(self, request, client_address):
        self.owner._connection_opened(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        # Counted as closed only once the socket really is closed.
        try:
            super().shutdown_request(request)
        finally:
            self.owner._connection_closed(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "test-upstream/1"
    # Headers and body go out as separate writes; without TCP_NODELAY, Nagle plus
    # the gateway's delayed ACK would add ~40 ms to every answer.
    disable_nagle_algorithm = True
    sys_version = ""

    def setup(self):
        self.owner = self.server.owner
        self.timeout = self.owner.idle_timeout
        super().setup()
        self.conn_id = self.owner._conn_id_of(self.connection)

    def log_message(self, fmt, *args):
        pass

    def version_string(self):
        return self.server_version

    # Every method goes through one handler.
    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_TRACE = do_GET

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            out = bytearray()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline(3)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status, body=b"", headers=(), content_type="application/json"):
        self.send_response(status)
        no_body = status in (204, 304) or status < 200
        if not no_body:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and not no_body:
            self.wfile.write(body)

    def _echo_doc(self, req):
        return {
            "server": self.owner.name,
            "method": req.method,
            "path": req.path,
            "query": req.query,
            "headers": req.headers,
            "body": req.body.decode("utf-8", "replace"),
            "body_len": len(req.body),
            "body_sha256": hashlib.sha256(req.body).hexdigest(),
            "conn": req.conn,
        }

    def _handle(self):
        headers = {}
        for k, v in self.headers.items():
            headers.setdefault(k.lower(), []).append(v)
        body = self._read_body()
        req = Request(self.command, self.path, headers, body, self.conn_id)
        self.owner._record(req)
        try:
            self._respond(req)
        finally:
            self.owner._done(req)

    def _respond(self, req):
        # Dispatch on the last matching segment, so any route prefix in front
        # (/p/status/201, /api/x/delay/50) reaches the same behaviour.
        path = req.path
        query = urllib.parse.parse_qs(req.query)
        stop = self.owner._stop_event
        chosen = re.search(r"/answer/([A-Za-z0-9_.~-]+)/?$", path)
        if chosen:
            self._respond_answer(chosen.group(1))
            return
        m = re.search(r"/(status|delay|big)/(\d+)/?$", path) or re.search(r"/(chunked|headers|close|reset)/?$", path)
        kind = m.group(1) if m else "echo"
        if not m and re.search(r"/respond/?$", path):
            kind = "respond"
        if kind == "respond":
            self._respond_chosen(urllib.parse.parse_qs(req.query, keep_blank_values=True))
        elif kind == "status":
            code = int(m.group(2))
            hdrs = [("Location", "/echo")] if 300 <= code < 400 else []
            doc = {"server": self.owner.name, "status": code}
            self._send(code, json.dumps(doc).encode(), hdrs)
        elif kind == "delay":
            stop.wait(int(m.group(2)) / 1000.0)
            self._send(200, json.dumps(self._echo_doc(req)).encode())
        elif kind == "chunked":
            n = int(query.get("n", ["5"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if self.command != "HEAD":
                for i in range(n):
                    piece = (CHUNKS[i % len(CHUNKS)] + str(i) + ";").encode()
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
        elif kind == "big":
            self._send(200, big_body(int(m.group(2))), content_type="application/octet-stream")
        elif kind == "headers":
            pairs = urllib.parse.parse_qsl(req.query, keep_blank_values=True)
            self._send(200, b'{"ok": true}', pairs)
        elif kind == "close":
            self.close_connection = True
            self._send(200, json.dumps(self._echo_doc(req)).encode(), [("Connection", "close")])
        elif kind == "reset":
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            delay = int(query.get("delay_ms", ["0"])[0])
            if delay:
                stop.wait(delay / 1000.0)
            self._send(200, json.dumps(self._echo_doc(req)).encode())


    def _respond_answer(self, name):
        """/answer/<name>: see set_answer()."""
        got = self.owner._answer(name)
        if got is None:
            self._send(404, json.dumps({"server": self.owner.name, "answer": name, "set": False}).encode())
            return
        status, headers, body, delay, ct = got
        if delay:
            self.owner._stop_event.wait(delay)
        self._send(status, body, headers, content_type=ct)

    def _respond_chosen(self, query):
        """/respond: see the module docstring."""
        def one(name, default):
            return query.get(name, [default])[0]
        size = int(one("size", "0"))
        kind = one("kind", "json")
        seed = int(one("seed", "0"))
        status = int(one("status", "200"))
        ct = query["ct"][0] if "ct" in query else "application/json"
        body = respond_body_gzipped(size, kind, seed) if one("gzip", "0") == "1" else respond_body(size, kind, seed)
        hdrs = []
        for h in query.get("h", []):
            name, _, value = h.partition(":")
            hdrs.append((name.strip(), value.strip()))
        no_body = status in (204, 304) or status < 200
        self.send_response(status)
        if ct:
            self.send_header("Content-Type", ct)
        chunked = one("chunked", "0") == "1" and not no_body
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        elif not no_body:
            self.send_header("Content-Length", str(len(body)))
        for k, v in hdrs:
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD" or no_body:
            return
        if chunked:
            piece = max(1, int(one("piece", "4096")))
            for i in range(0, len(body), piece):
                part = body[i:i + piece]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)


class Upstream:
    """The server; start() binds a free loopback port (or `port`), stop() closes everything."""

    def __init__(self, name="up", port=0, idle_timeout=30.0):
        self.name = name
        self.idle_timeout = idle_timeout
        self._want_port = port
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop_event = threading.Event()
        self._server = None
        self._thread = None
        self._socks = {}
        self._next_conn = 0
        self._answers = {}
        self.reset()

    # --- life cycle -------------------------------------------------------
    def start(self):
        self._server = _Server(("127.0.0.1", self._want_port), _Handler)
        self._server.owner = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="upstream-" + self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._server is None:
            return
        self._stop_event.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            socks = [entry[0] for entry in self._socks.values()]
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(5)
        self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    # --- answers chosen by the test (/answer/<name>) --------------------------
    def set_answer(self, name, body=b"", status=200, headers=(), delay=0.0, content_type="application/json"):
        """From now on /answer/<name> answers `status` with `headers` (a list of
        (name, value)) and `body` (bytes or str), after `delay` seconds."""
        if isinstance(body, str):
            body = body.encode()
        with self._lock:
            self._answers[name] = (status, list(headers), body, delay, content_type)

    def _answer(self, name):
        with self._lock:
            return self._answers.get(name)

    # --- what it saw ------------------------------------------------------
    def reset(self):
        """Forget every request and connection counted so far."""
        with self._lock:
            self.requests = []
            self.connections = 0
            self.in_flight = 0

    def seen(self, path=None, method=None, prefix=None):
        """Requests seen, filtered by exact path, path prefix and/or method."""
        with self._lock:
            return [r for r in self.requests
                    if (path is None or r.path == path)
                    and (prefix is None or r.path.startswith(prefix))
                    and (method is None or r.method == method)]

    def count(self, path=None, method=None, prefix=None):
        return len(self.seen(path, method, prefix))

    def counts_by_method(self):
        with self._lock:
            return Counter(r.method for r in self.requests)

    def counts_by_path(self):
        with self._lock:
            return Counter(r.path for r in self.requests)

    @property
    def last(self):
        with self._lock:
            return self.requests[-1] if self.requests else None

    @property
    def open_connections(self):
        """Connections open right now (accepted and not yet closed by either side)."""
        with self._lock:
            return len(self._socks)

    def wait_in_flight(self, n, timeout=10.0):
        """Block until at least n requests are being handled at once; False at the deadline."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.in_flight < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def summary(self, last=20):
        with self._lock:
            reqs = self.requests[-last:]
            return "upstream %s on %d: %d requests, %d connections; last: %s" % (
                self.name, getattr(self, "port", 0), len(self.requests), self.connections, reqs)

    # --- called by the handler threads ------------------------------------
    def _connection_opened(self, sock):
        with self._lock:
            self.connections += 1
            self._next_conn += 1
            self._socks[id(sock)] = (sock, self._next_conn)

    def _conn_id_of(self, sock):
        with self._lock:
            entry = self._socks.get(id(sock))
        return entry[1] if entry else 0

    def _connection_closed(self, sock):
        with self._lock:
            self._socks.pop(id(sock), None)

    def _record(self, req):
        with self._cond:
            self.requests.append(req)
            self.in_flight += 1
            self._cond.notify_all()

    def _done(self, req):
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()


class DeadPort:
    """A loopback port with nothing listening: bound (so nobody else takes it) but
    not listening, so every connect is refused at once."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


if __name__ == "__main__":
    import sys
    up = Upstream(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0).start()
    print("listening on", up.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        up.stop()
