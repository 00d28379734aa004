"""Streamed upstream answers: bodies over the 1 MiB buffer (or text/event-stream)
go to the client as they arrive, compressed piece by piece when they qualify,
with flow control, an idle deadline, and cut answers when the upstream breaks.

The upstream is a scripted raw-socket server of this file (ScriptedUpstream):
the request's query says how to answer, so framing (Content-Length, chunked,
close-delimited), pauses, stalls and deaths are exact. It counts the
connections it accepted and the body bytes it managed to send.

What is asserted is what a client sees (status, headers, decoded body bytes,
when they arrive, a cut answer), what the upstream saw (connections, bytes it
could send while the client did not read) and the gateway's own memory
(VmRSS), access log and metrics.
"""

import ctypes
import hashlib
import http.client
import os
import random
import signal
import socket
import ssl
import threading
import time
import urllib.parse
import zlib

import pytest

from harness import gateway_config, make_cert, route, upstream_config, wait_until
from redis_server import redis_server  # noqa: F401 - the fixture
from upstream import respond_body

KIB = 1024
MIB = 1024 * 1024
BUFFER = MIB  # the gateway buffers answers up to this whole (GW_STREAM_BUFFER_BYTES)
COMPRESSION = {"algorithms": ["br", "gzip"], "min_bytes": 1024,
               "types": ["application/json", "text/*"], "brotli_quality": 5, "gzip_level": 6}
SERVER = {"request_timeout": "30s", "read_timeout": "30s", "drain_timeout": "10s"}


# ---------------------------------------------------------------------------
# Bodies

_BLOCK = random.Random(7).randbytes(MIB)


def body_of(size, kind):
    """json: respond_body's compressible JSON; blob: a 1 MiB random block
    repeated (large answers, cheap to make and hash)."""
    if kind == "json":
        return respond_body(size, "json")
    reps, rest = divmod(size, MIB)
    return _BLOCK * reps + _BLOCK[:rest]


def blob_digest(size):
    h = hashlib.sha256()
    reps, rest = divmod(size, MIB)
    for _ in range(reps):
        h.update(_BLOCK)
    h.update(_BLOCK[:rest])
    return h.hexdigest()


# ---------------------------------------------------------------------------
# The scripted upstream

class ScriptedUpstream:
    """GET /<anything>?size=N&kind=json|blob&frame=cl|chunked|close&ct=TYPE
    &piece=BYTES&pause_at=BYTES&pause_ms=MS&die_at=BYTES&stall_at=BYTES
    &stall_ms=MS&sse=1&status=CODE&h=LINE (repeatable)&tag=NAME. The
    answer's status is CODE (200), with each h= header line added; its body is
    body_of(size, kind), written in
    pieces (chunks when chunked); at pause_at bytes it waits pause_ms; at
    die_at it closes the connection (as a process that dies does); at stall_at it sends nothing
    for stall_ms, then closes. sse=1: text/event-stream events
    ("data: <n>\\n\\n"), the first at once. HEAD answers the head only.
    Keep-alive for cl and chunked. The body bytes sent for an answer with a
    tag are counted in sent_by[tag] (answers running at once apart)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.connections = 0
        self.requests = 0
        self.sent = 0  # body bytes of the answer being written (the last one)
        self.sent_by = {}  # tag= of an answer -> its body bytes sent so far
        self.closed_early = 0  # answers whose client (the gateway) went away mid-body
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def close(self):
        self.stop.set()
        self.sock.close()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                line = head.split(b"\r\n", 1)[0].decode()
                method, target, _ = line.split(" ", 2)
                with self.lock:
                    self.requests += 1
                if not self._answer(conn, method, target):
                    return
        except OSError:
            pass
        finally:
            conn.close()

    def _answer(self, conn, method, target):
        """Write one answer; False when the connection is to be closed."""
        pairs = urllib.parse.parse_qsl(urllib.parse.urlsplit(target).query)
        q = dict(pairs)
        extra = [v for k, v in pairs if k == "h"]
        tag = q.get("tag")
        size = int(q.get("size", 0))
        frame = q.get("frame", "cl")
        sse = q.get("sse") == "1"
        body = body_of(size, q.get("kind", "json")) if not sse else b""
        piece = int(q.get("piece", 65536))
        pause_at, pause_ms = int(q.get("pause_at", -1)), int(q.get("pause_ms", 0))
        die_at = int(q.get("die_at", -1))
        stall_at, stall_ms = int(q.get("stall_at", -1)), int(q.get("stall_ms", 0))
        ct = q.get("ct", "text/event-stream" if sse else "application/json")
        status = int(q.get("status", 200))
        lines = ["HTTP/1.1 %d %s" % (status, http.client.responses.get(status, "X")), "Content-Type: " + ct]
        lines += extra
        if frame == "cl":
            lines.append("Content-Length: %d" % size)
        elif frame == "chunked":
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append("Connection: close")
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        if method == "HEAD":
            return frame != "close"
        with self.lock:
            self.sent = 0
            if tag:
                self.sent_by[tag] = 0

        def send(data):
            if frame == "chunked":
                conn.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
            else:
                conn.sendall(data)
            with self.lock:
                self.sent += len(data)
                if tag:
                    self.sent_by[tag] += len(data)

        if sse:
            n = int(q.get("events", 3))
            for i in range(n):
                send(b"data: %d\n\n" % i)
                if i == 0 and pause_ms:
                    time.sleep(pause_ms / 1000)
            if frame == "chunked":
                conn.sendall(b"0\r\n\r\n")
            return frame != "close"
        pos = 0
        view = memoryview(body)
        try:
            while pos < size:
                step = min(piece, size - pos)
                for mark in (pause_at, die_at, stall_at):
                    if pos < mark < pos + step:
                        step = mark - pos
                if pos == pause_at and pause_ms:
                    time.sleep(pause_ms / 1000)
                if pos == die_at:
                    return False  # closed by _serve, as when the process dies
                if pos == stall_at:
                    self.stop.wait(stall_ms / 1000)
                    return False
                send(view[pos:pos + step])
                pos += step
        except OSError:
            with self.lock:
                self.closed_early += 1
            return False
        if frame == "chunked":
            conn.sendall(b"0\r\n\r\n")
        return frame != "close"


@pytest.fixture(scope="module")
def up():
    u = ScriptedUpstream()
    yield u
    u.close()


def streaming_gateway(stack, up, name=None, timeout="5s", compression=COMPRESSION, routes=None, env=None,
                      **sections):
    cfg = gateway_config({"up": upstream_config([up.address], timeout=timeout, keepalive=8, retries=0)},
                         routes=routes, server=SERVER, log={"level": "info"}, **sections)
    if compression is not None:
        cfg["compression"] = compression
    return stack.gateway(cfg, name=name, env=env)


@pytest.fixture(scope="module")
def gw(module_stack, up):
    return streaming_gateway(module_stack, up)


def path(size=0, kind="json", frame="cl", fields=(), **kw):
    """The scripted upstream's URL; fields: (name, value) pairs it adds to its head."""
    q = {"size": size, "kind": kind, "frame": frame}
    q.update(kw)
    return "/s?" + urllib.parse.urlencode(list(q.items()) + [("h", "%s: %s" % f) for f in fields])


# ---------------------------------------------------------------------------
# Client side

class _BrotliStream:
    """BrotliDecoderDecompressStream from libbrotlidec.so.1, fed piece by piece."""

    def __init__(self):
        lib = ctypes.CDLL("libbrotlidec.so.1")
        lib.BrotliDecoderCreateInstance.restype = ctypes.c_void_p
        lib.BrotliDecoderCreateInstance.argtypes = [ctypes.c_void_p] * 3
        lib.BrotliDecoderDestroyInstance.argtypes = [ctypes.c_void_p]
        lib.BrotliDecoderDecompressStream.restype = ctypes.c_int
        lib.BrotliDecoderDecompressStream.argtypes = [
            ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        self.lib = lib
        self.state = lib.BrotliDecoderCreateInstance(None, None, None)
        self.finished = False

    def feed(self, data):
        out = []
        src = ctypes.create_string_buffer(data, len(data))
        avail_in = ctypes.c_size_t(len(data))
        next_in = ctypes.c_void_p(ctypes.addressof(src))
        dst = ctypes.create_string_buffer(1 << 20)
        while True:
            avail_out = ctypes.c_size_t(len(dst))
            next_out = ctypes.c_void_p(ctypes.addressof(dst))
            rc = self.lib.BrotliDecoderDecompressStream(self.state, ctypes.byref(avail_in), ctypes.byref(next_in),
                                                       ctypes.byref(avail_out), ctypes.byref(next_out), None)
            out.append(dst.raw[:len(dst) - avail_out.value])
            if rc == 0:
                raise AssertionError("brotli: corrupt stream")
            if rc == 1:
                self.finished = True
            if rc != 3:  # not NEEDS_MORE_OUTPUT
                return b"".join(out)

    def close(self):
        self.lib.BrotliDecoderDestroyInstance(self.state)


class Decoder:
    def __init__(self, coding):
        self.coding = coding
        self.z = zlib.decompressobj(31) if coding == "gzip" else None
        self.b = _BrotliStream() if coding == "br" else None

    def feed(self, data):
        if self.z:
            return self.z.decompress(data)
        if self.b:
            return self.b.feed(data)
        return data

    def finish(self):
        if self.z:
            assert self.z.eof, "gzip stream not finished"
        if self.b:
            assert self.b.finished, "brotli stream not finished"
            self.b.close()


def get(gw, target, ae=None, method="GET", timeout=60):
    """(response, raw body) of one request on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        if ae is not None:
            conn.putheader("Accept-Encoding", ae)
        conn.endheaders()
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def decoded(resp, raw):
    coding = resp.getheader("Content-Encoding", "identity")
    d = Decoder(coding)
    out = d.feed(raw)
    d.finish()
    return out


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def live(gw):
    resp, _ = get(gw, "/live", timeout=5)
    return resp.status == 200


def read_to_eof(s):
    """Everything the gateway sends on s until it closes; s is closed after."""
    data = b""
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        data += b
    s.close()
    return data


# ---------------------------------------------------------------------------
# Byte-equal bodies, buffered and streamed

SIZES = [0, 1, KIB, MIB - 1, MIB + 1, 3 * MIB, 8 * MIB]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "%dB" % s)
@pytest.mark.parametrize("coding", ["identity", "gzip", "br"])
@pytest.mark.parametrize("frame", ["cl", "chunked", "close"])
def test_decoded_body_equals_identity(gw, up, frame, coding, size):
    body = body_of(size, "json")
    resp, raw = get(gw, path(size, frame=frame), ae=None if coding == "identity" else coding)
    assert resp.status == 200, (resp.status, resp.getheaders())
    got = decoded(resp, raw)
    assert got == body, "%s %s %d: decoded %d bytes, expected %d" % (frame, coding, size, len(got), len(body))
    expect = coding if size >= COMPRESSION["min_bytes"] else "identity"
    assert resp.getheader("Content-Encoding", "identity") == expect, resp.getheaders()
    cl = resp.getheader("Content-Length")
    te = resp.getheader("Transfer-Encoding")
    if size <= BUFFER:
        # buffered: the length is known, whatever the upstream's framing
        assert cl == str(len(raw)) and te is None, ("buffered answer", resp.getheaders())
    elif expect == "identity" and frame == "cl":
        # streamed, identity, upstream Content-Length: kept, not chunked
        assert cl == str(size) and te is None, ("streamed with its length", resp.getheaders())
    else:
        # streamed without a length: chunked to an HTTP/1.1 client
        assert cl is None and te == "chunked", ("streamed, chunked", resp.getheaders())
    if expect != "identity":
        assert "accept-encoding" in resp.getheader("Vary", "").lower(), resp.getheaders()


def test_http10_client_gets_close_delimited_stream(gw, up):
    """No length and no chunked coding for HTTP/1.0: the body ends with the
    connection."""
    size = 2 * MIB
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(("GET %s HTTP/1.0\r\nAccept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n"
               % path(size, frame="chunked")).encode())
    data = read_to_eof(s)
    head, raw = data.split(b"\r\n\r\n", 1)
    text = head.decode().lower()
    assert text.startswith("http/1.") and " 200 " in text.split("\r\n")[0], text
    assert "content-length" not in text and "transfer-encoding" not in text, text
    assert "content-encoding: gzip" in text, text
    assert zlib.decompress(raw, 31) == body_of(size, "json")


# ---------------------------------------------------------------------------
# It really streams

def _first_bytes_time(gw, target, want, ae=None):
    """(seconds until `want` decoded body bytes arrived, seconds until the end,
    decoded body)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    t0 = time.monotonic()
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n%sConnection: close\r\n\r\n"
               % (target, "Accept-Encoding: %s\r\n" % ae if ae else "")).encode())
    f = s.makefile("rb")
    resp = http.client.HTTPResponse(s)
    resp.begin()
    dec = Decoder(resp.getheader("Content-Encoding", "identity"))
    got, first = b"", None
    while True:
        b = resp.read1(1 << 16)
        if not b:
            break
        got += dec.feed(b)
        if first is None and len(got) >= want:
            first = time.monotonic() - t0
    end = time.monotonic() - t0
    f.close()
    s.close()
    return first, end, got


@pytest.mark.parametrize("coding", ["identity", "gzip", "br"])
def test_large_chunked_answer_streams_before_a_pause(gw, up, coding):
    size, at = 3 * MIB, 2 * MIB
    first, end, got = _first_bytes_time(gw, path(size, frame="chunked", pause_at=at, pause_ms=1500),
                                        at - 64 * KIB, ae=None if coding == "identity" else coding)
    assert got == body_of(size, "json")
    assert end >= 1.4, "the pause did not happen? %.2fs" % end
    assert first is not None and first < 1.2, \
        "the first %d bytes came after %.2fs: not streamed before the 1.5 s pause" % (at - 64 * KIB, first)


@pytest.mark.parametrize("coding", ["identity", "gzip", "br"])
def test_event_stream_streams_whatever_its_size(gw, up, coding):
    """A text/event-stream is streamed at once (and flushed through the
    compressor): the first event arrives before the upstream's pause ends."""
    first, end, got = _first_bytes_time(gw, path(frame="chunked", sse=1, pause_ms=1500, events=3),
                                        len(b"data: 0\n\n"), ae=None if coding == "identity" else coding)
    assert got == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert end >= 1.4, end
    assert first is not None and first < 1.0, "first event after %.2fs" % first


# ---------------------------------------------------------------------------
# Flow control, size

def small_quarantine_env():
    """ASAN_OPTIONS for a gateway whose RSS a test measures: on a sanitizer
    build ASan's quarantine of freed memory (256 MB by default) would count in
    RSS; kept at 1 MB, RSS measures what the gateway holds (other builds
    ignore the variable)."""
    return {"ASAN_OPTIONS": ":".join(x for x in (os.environ.get("ASAN_OPTIONS"), "quarantine_size_mb=1") if x)}


def test_slow_client_bounded_memory(module_stack, up):
    """A client that does not read a 64 MiB answer for a while: the gateway
    stops reading the upstream (which cannot send it all), its RSS stays
    within 32 MiB of where it was, and the whole body arrives when the client
    reads."""
    gw = streaming_gateway(module_stack, up, name="gw-slow", env=small_quarantine_env())
    size = 64 * MIB
    get(gw, path(2 * MIB, kind="blob", frame="cl"))  # warm: buffers and pools exist
    base = rss_kib(gw.pid)
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
               % path(size, kind="blob", frame="chunked")).encode())
    peak = base
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(gw.pid))
        time.sleep(0.05)
    with up.lock:
        sent_while_stalled = up.sent
    assert sent_while_stalled < size - 16 * MIB, \
        "the upstream sent %d of %d bytes while the client read nothing" % (sent_while_stalled, size)
    assert peak - base < 32 * 1024, "RSS grew by %d KiB (base %d KiB)" % (peak - base, base)
    resp = http.client.HTTPResponse(s)
    resp.begin()
    assert resp.status == 200
    h = hashlib.sha256()
    n = 0
    while True:
        b = resp.read1(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
        peak = max(peak, rss_kib(gw.pid)) if n % (8 * MIB) < (1 << 20) else peak
    s.close()
    assert n == size and h.hexdigest() == blob_digest(size)
    assert peak - base < 32 * 1024, "RSS grew by %d KiB while reading" % (peak - base)


# Streamed brotli, several slow clients. Budget per stream: the encoder (a
# 512 KiB window, BROTLI_PARAM_LGWIN 19: window, quality 5's hash table,
# commands and block storage, about 2 MiB) + what flow control lets wait for
# the client (GW_STREAM_HIGH_BYTES, 256 KiB) + one upstream read (256 KiB):
# 2.5 MiB. The bound is twice that per stream (allocator rounding, each
# worker's own malloc arena, a sanitizer's redzones) plus 8 MiB for the rest
# of the process: 38 MiB for six. Measured: +13 to +16 MiB (+26 MiB on the
# ASan build); with brotli's default 4 MiB window (lgwin 22) +86 to +146 MiB.
BR_STREAMS = 6
BR_STREAM_BUDGET_KIB = 2 * 1024 + 256 + 256
BR_RSS_BOUND_KIB = BR_STREAMS * BR_STREAM_BUDGET_KIB * 2 + 8 * 1024


def test_slow_br_clients_bounded_memory(module_stack, up):
    """Six clients ask for a 32 MiB chunked JSON answer with Accept-Encoding:
    br and read nothing for 3 s: the gateway's RSS grows by less than
    BR_RSS_BOUND_KIB (above), then and while they read, and every body
    decodes to the upstream's. (How much the upstream could send meanwhile is
    printed, not asserted: at a fifth of its size compressed, a 32 MiB
    answer can sit whole in socket buffers, tcp_rmem going up to 32 MiB;
    test_slow_client_bounded_memory covers flow control with a body that
    does not compress.)"""
    # A gateway of its own, with ASan's quarantine kept small (see above).
    gw = streaming_gateway(module_stack, up, name="gw-br-slow", env=small_quarantine_env())
    size = 32 * MIB
    body = body_of(size, "json")  # made (and cached) before anything is timed
    # warm: every worker has streamed brotli before (its arena and kept blocks
    # exist); connections land on a worker by hash, twelve miss one 1 in 2048
    for _ in range(12):
        resp, raw = get(gw, path(2 * MIB, frame="chunked"), ae="br")
        assert resp.getheader("Content-Encoding") == "br" and decoded(resp, raw) == body_of(2 * MIB, "json")
    base = rss_kib(gw.pid)
    socks = []
    try:
        for i in range(BR_STREAMS):
            s = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KIB)
            s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\nAccept-Encoding: br\r\nConnection: close\r\n\r\n"
                       % path(size, frame="chunked", tag="br-slow-%d" % i)).encode())

        def started():
            with up.lock:
                return len([t for t in up.sent_by if t.startswith("br-slow-")]) == BR_STREAMS
        wait_until(started, 10, "all %d answers under way upstream" % BR_STREAMS)
        peak = base
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            peak = max(peak, rss_kib(gw.pid))
            time.sleep(0.05)
        with up.lock:
            stalled = sorted(n for t, n in up.sent_by.items() if t.startswith("br-slow-"))
        stalled_peak = peak
        assert peak - base < BR_RSS_BOUND_KIB, \
            "RSS grew by %d KiB with %d br streams waiting (bound %d KiB, base %d KiB)" % (
                peak - base, BR_STREAMS, BR_RSS_BOUND_KIB, base)

        results = [None] * BR_STREAMS
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, rss_kib(gw.pid))
                time.sleep(0.05)

        def read(i):
            try:
                resp = http.client.HTTPResponse(socks[i])
                resp.begin()
                dec = Decoder(resp.getheader("Content-Encoding", "identity"))
                out = []
                while True:
                    b = resp.read1(1 << 20)
                    if not b:
                        break
                    out.append(dec.feed(b))
                dec.finish()
                results[i] = (resp.status, resp.getheader("Content-Encoding"), b"".join(out))
            except Exception as e:  # noqa: BLE001 - reported below
                results[i] = e

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(BR_STREAMS)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(120)
        stop.set()
        sampler.join(5)
    finally:
        for s in socks:
            s.close()
    print("br streams: RSS base %d KiB, +%d KiB stalled, +%d KiB at most while read; upstream sent %s" % (
        base, stalled_peak - base, peak - base, stalled))
    for i, got in enumerate(results):
        assert got is not None and not isinstance(got, Exception), "client %d: %r" % (i, got)
        status, coding, data = got
        assert status == 200 and coding == "br", (i, status, coding)
        assert len(data) == size and data == body, "client %d: decoded %d bytes, not the upstream's body" % (
            i, len(data))
    assert peak - base < BR_RSS_BOUND_KIB, "RSS grew by %d KiB while the br streams were read" % (peak - base)


def test_body_over_the_old_64_mib_limit(gw, up):
    size = 100 * MIB
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    conn.request("GET", path(size, kind="blob", frame="cl", piece=256 * KIB))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Length") == str(size), resp.getheaders()
    h = hashlib.sha256()
    n = 0
    while True:
        b = resp.read(1 << 20)
        if not b:
            break
        h.update(b)
        n += len(b)
    conn.close()
    assert n == size and h.hexdigest() == blob_digest(size)


# ---------------------------------------------------------------------------
# Breaks

@pytest.mark.parametrize("frame", ["cl", "chunked"])
def test_upstream_dying_mid_stream_cuts_the_answer(gw, up, frame):
    size, die = 4 * MIB, 2 * MIB + 12345
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.request("GET", path(size, frame=frame, die_at=die))
    resp = conn.getresponse()
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    conn.close()
    got = cut.value.partial
    assert 0 < len(got) <= die and got == body_of(size, "json")[:len(got)], len(got)
    # the gateway is fine and says what happened
    assert live(gw)
    resp, raw = get(gw, path(2 * MIB, frame=frame))
    assert resp.status == 200 and raw == body_of(2 * MIB, "json")
    wait_until(lambda: "streamed answer cut" in gw.stderr(), 5, "a warn line about the cut answer")
    m = gw.metrics()
    assert m.sum("gateway_upstream_errors_total", upstream="up") >= 1


def test_client_leaving_mid_stream(gw, up):
    """The client goes away: the gateway closes the upstream connection (not
    reused: the next request comes on a new one) and stays healthy."""
    get(gw, path(10))  # a keep-alive connection to the upstream exists
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path(64 * MIB, kind="blob", frame="chunked")).encode())
    got = 0
    while got < 4 * MIB:
        b = s.recv(1 << 20)
        assert b
        got += len(b)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST
    # the upstream sees its connection closed mid-answer: not kept for reuse
    wait_until(lambda: up.closed_early >= 1, 10, "the upstream's answer to be cut off by the gateway")
    for _ in range(3):
        resp, raw = get(gw, path(3 * MIB, frame="chunked"))
        assert resp.status == 200 and raw == body_of(3 * MIB, "json")
    assert live(gw)


def test_client_closing_during_a_quiet_stream_is_noticed(gw, up):
    """A client that closes while its event stream is quiet (the upstream pauses
    5 s after the first event) is noticed at once, not at the next write: the
    request ends and the upstream call with it (it was 4 s late on the own
    server side before it watched for the close while streaming)."""
    def in_flight():
        return gw.metrics().sum("http_requests_in_flight")
    assert in_flight() == 0
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path(frame="chunked", sse=1, pause_ms=5000,
                                                         events=2)).encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        assert b, "closed before the head"
        buf += b
    assert buf.startswith(b"HTTP/1.1 200 "), buf[:200]
    assert in_flight() == 1
    t0 = time.monotonic()
    s.close()  # a FIN, in the upstream's pause
    wait_until(lambda: in_flight() == 0, 2.0, "the gateway to notice the client left during the stream's pause")
    assert time.monotonic() - t0 < 2.0
    assert live(gw)


def test_half_closing_pipelined_client_gets_a_streamed_answer_and_the_next(gw, up):
    """A client pipelines a streamed answer (4 MiB, over the buffer) and a small
    one, then shuts its side: it gets both whole. Only a client whose end of
    stream is all that follows is taken as gone (the test above)."""
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    big, small = path(4 * MIB, kind="blob", frame="chunked"), path(10)
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n\r\nGET %s HTTP/1.1\r\nHost: t\r\n\r\n" % (big, small)).encode())
    s.shutdown(socket.SHUT_WR)
    buf = read_to_eof(s)
    assert buf.startswith(b"HTTP/1.1 200 "), buf[:200]
    assert buf.count(b"HTTP/1.1 200 ") == 2, "got %d bytes, %d answers" % (len(buf), buf.count(b"HTTP/1.1 200 "))
    assert len(buf) > 4 * MIB, len(buf)
    assert buf.endswith(body_of(10, "json")), buf[-200:]


def test_idle_timeout_mid_stream(module_stack, up):
    """Nothing from the upstream for longer than its timeout (1 s): the stream
    is cut about then, not before."""
    g = streaming_gateway(module_stack, up, name="gw-idle", timeout="1s")
    s = socket.create_connection(("127.0.0.1", g.port), timeout=30)
    s.sendall(("GET %s HTTP/1.1\r\nHost: t\r\n\r\n"
               % path(4 * MIB, frame="chunked", stall_at=2 * MIB, stall_ms=6000)).encode())
    resp = http.client.HTTPResponse(s)
    resp.begin()
    assert resp.status == 200
    got, last = 0, None
    while True:
        try:
            b = resp.read1(1 << 16)
        except http.client.IncompleteRead as e:  # noqa: PERF203
            got += len(e.partial)
            break
        if not b:
            break
        got += len(b)
        last = time.monotonic()
    cut = time.monotonic() - last
    s.close()
    assert got == 2 * MIB, got
    assert 0.9 <= cut <= 2.5, "cut %.2fs after the last byte, the upstream timeout is 1 s" % cut
    wait_until(lambda: "timed out" in g.stderr(), 5, "a warn line")
    assert live(g)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_quiet_stream_outlives_the_client_read_timeout(module_stack, up, tls):
    """server.read_timeout (1 s here) bounds a client's reads and sends, not the
    gaps of an event stream: a 1.5 s pause between events does not cut it, on
    our own client I/O and on evhttp's TLS bufferevent alike; a large answer
    passes over TLS too."""
    server = dict(SERVER, read_timeout="1s")
    if tls:
        cert, key = make_cert(module_stack.scratch, "stream")
        server["tls"] = {"cert": str(cert), "key": str(key)}
    cfg = gateway_config({"up": upstream_config([up.address], timeout="5s", keepalive=8, retries=0)},
                         server=server, compression=COMPRESSION)
    g = module_stack.gateway(cfg, name="gw-quiet-%s" % ("tls" if tls else "plain"))
    ctx = ssl._create_unverified_context() if tls else None

    def conn():
        if tls:
            return http.client.HTTPSConnection("127.0.0.1", g.port, timeout=30, context=ctx)
        return http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)

    c = conn()
    c.putrequest("GET", path(frame="chunked", sse=1, pause_ms=1500, events=3), skip_accept_encoding=True)
    c.putheader("Accept-Encoding", "gzip")
    c.endheaders()
    resp = c.getresponse()
    dec = Decoder(resp.getheader("Content-Encoding", "identity"))
    got = dec.feed(resp.read())
    dec.finish()
    c.close()
    assert got == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    c = conn()
    c.request("GET", path(8 * MIB, frame="chunked"), headers={"Accept-Encoding": "br"})
    resp = c.getresponse()
    raw = resp.read()
    c.close()
    assert resp.getheader("Content-Encoding") == "br" and decoded(resp, raw) == body_of(8 * MIB, "json")


# ---------------------------------------------------------------------------
# Negotiation rules hold for streamed answers

@pytest.mark.parametrize("ae", [None, "identity", "gzip;q=0, br;q=0", "deflate"])
def test_no_coding_unless_accepted(gw, up, ae):
    resp, raw = get(gw, path(3 * MIB, frame="chunked"), ae=ae)
    assert resp.status == 200 and resp.getheader("Content-Encoding") is None, resp.getheaders()
    assert raw == body_of(3 * MIB, "json")
    assert "accept-encoding" in resp.getheader("Vary", "").lower()  # it qualifies


def test_br_only_never_gzip(gw, up):
    resp, raw = get(gw, path(3 * MIB, frame="chunked"), ae="br")
    assert resp.getheader("Content-Encoding") == "br"
    assert decoded(resp, raw) == body_of(3 * MIB, "json")


@pytest.mark.parametrize("frame", ["cl", "chunked"])
@pytest.mark.parametrize("ae", ["br", "gzip", "gzip, br"])
def test_no_transform_streams_uncompressed(gw, up, frame, ae):
    """A 3 MiB answer with Cache-Control: no-transform streams to a client that
    accepts br and gzip as the upstream sent it: no Content-Encoding, the
    same bytes, no Vary (it does not qualify)."""
    size = 3 * MIB
    cc = "public, no-transform"
    resp, raw = get(gw, path(size, frame=frame, fields=[("Cache-Control", cc)]), ae=ae)
    assert resp.status == 200, resp.getheaders()
    assert resp.getheader("Content-Encoding") is None, resp.getheaders()
    assert raw == body_of(size, "json"), "%d bytes, not the upstream's" % len(raw)
    assert resp.getheader("Cache-Control") == cc
    assert "accept-encoding" not in resp.getheader("Vary", "").lower(), resp.getheaders()
    # it streamed (a buffered answer would have a Content-Length whatever the framing)
    if frame == "chunked":
        assert resp.getheader("Transfer-Encoding") == "chunked", resp.getheaders()
    else:
        assert resp.getheader("Content-Length") == str(size), resp.getheaders()
    # the same answer without no-transform is compressed: the rule is what stops it
    resp, raw = get(gw, path(size, frame=frame, fields=[("Cache-Control", "public")]), ae=ae)
    assert resp.getheader("Content-Encoding") == ae.split(",")[-1].strip() and \
        decoded(resp, raw) == body_of(size, "json"), resp.getheaders()


@pytest.mark.parametrize("frame", ["cl", "chunked"])
@pytest.mark.parametrize("status", [206, 200])
def test_ranges_stream_uncompressed_byte_exact(gw, up, frame, status):
    """A 3 MiB partial answer (206, or a 200 that still carries Content-Range)
    streams byte-exact to a client accepting br and gzip: byte ranges of a
    compressed body would be ranges of a different representation."""
    size = 3 * MIB
    cr = "bytes 1048576-%d/%d" % (1048576 + size - 1, 16 * MIB)
    resp, raw = get(gw, path(size, kind="json", frame=frame, status=status,
                             fields=[("Content-Range", cr), ("Accept-Ranges", "bytes")]), ae="br, gzip")
    assert resp.status == status, resp.getheaders()
    assert resp.getheader("Content-Encoding") is None, resp.getheaders()
    assert resp.getheader("Content-Range") == cr, resp.getheaders()
    assert resp.getheader("Accept-Ranges") == "bytes", resp.getheaders()
    assert len(raw) == size and raw == body_of(size, "json"), "%d bytes, not the upstream's" % len(raw)
    if frame == "chunked":
        assert resp.getheader("Transfer-Encoding") == "chunked", resp.getheaders()
    else:
        assert resp.getheader("Content-Length") == str(size), resp.getheaders()


def test_not_compressible_type_streams_as_is(gw, up):
    resp, raw = get(gw, path(3 * MIB, frame="chunked", ct="image/png"), ae="gzip, br")
    assert resp.getheader("Content-Encoding") is None and raw == body_of(3 * MIB, "json")


def test_head_of_a_large_resource(module_stack, up, gw):
    resp, raw = get(gw, path(8 * MIB, frame="cl"), method="HEAD", ae="gzip")
    assert resp.status == 200 and raw == b"", resp.getheaders()
    assert resp.getheader("Content-Length") == str(8 * MIB)
    # on a cached route a HEAD is fetched as GET; too large to store, it
    # streams: the head is all the client gets
    routes = [dict(route("c", "up", prefix="/"), cache={"ttl": "60s"})]
    g = streaming_gateway(module_stack, up, name="gw-cached", routes=routes,
                          cache={"store": "memory", "max_object_bytes": 64 * KIB})
    resp, raw = get(g, path(8 * MIB, frame="cl"), method="HEAD")
    assert resp.status == 200 and raw == b"", resp.getheaders()
    assert resp.getheader("Content-Length") == str(8 * MIB), resp.getheaders()
    assert resp.getheader("X-Cache") == "MISS"
    resp, raw = get(g, path(3 * MIB, frame="chunked"), ae="gzip")  # and a GET streams, not stored
    assert resp.getheader("X-Cache") == "MISS" and decoded(resp, raw) == body_of(3 * MIB, "json")
    resp, raw = get(g, path(3 * MIB, frame="chunked"))
    assert resp.getheader("X-Cache") == "MISS" and raw == body_of(3 * MIB, "json")
    assert live(g)


def test_write_with_invalidate_holds_a_streamed_head(module_stack, up, redis_server):  # noqa: F811
    """A write on a route with invalidate: answers only once the invalidation
    is done in Redis, streamed or not: with Redis paused for 0.6 s, the head
    of a 3 MiB streamed answer comes after the pause, then all of it."""
    routes = [dict(route("w", "up", prefix="/", methods=["POST"]), invalidate=["cache:GET:/s*"])]
    g = streaming_gateway(module_stack, up, name="gw-inval", routes=routes, cache={"store": "redis"},
                          redis=redis_server.redis_section(timeout="3s"))
    redis_server.cli("set", "cache:GET:/s-old", "x")
    wait_until(lambda: live(g), 5, "the gateway")
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
    redis_server.pause(0.6)
    t0 = time.monotonic()
    conn.request("POST", path(3 * MIB, frame="chunked"), body=b"")
    resp = conn.getresponse()
    head = time.monotonic() - t0
    raw = resp.read()
    conn.close()
    assert resp.status == 200 and raw == body_of(3 * MIB, "json")
    assert resp.getheader("Transfer-Encoding") == "chunked", resp.getheaders()  # it streamed
    assert 0.5 <= head <= 1.5, "the head came %.2fs after the request (Redis paused 0.6 s, hold at most 1 s)" % head
    assert redis_server.cli("exists", "cache:GET:/s-old").strip() == "0"


# ---------------------------------------------------------------------------
# Access log, metrics, drain

def test_access_log_of_a_streamed_answer(gw, up):
    rid = "stream-log-1"
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    conn.putrequest("GET", path(3 * MIB, frame="chunked", pause_at=2 * MIB, pause_ms=500),
                    skip_accept_encoding=True)
    conn.putheader("Accept-Encoding", "gzip")
    conn.putheader("X-Request-Id", rid)
    conn.endheaders()
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    line = wait_until(lambda: [d for d in gw.access_log() if d.get("request_id") == rid], 5,
                      "access-log line")[0]
    assert line["status"] == 200
    assert line["bytes"] == len(raw), (line, len(raw))
    assert line["duration_ms"] >= 450, line


def test_drain_waits_for_a_stream(module_stack, up):
    g = streaming_gateway(module_stack, up, name="gw-drain")
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
    conn.request("GET", path(3 * MIB, frame="chunked", pause_at=2 * MIB, pause_ms=1000))
    resp = conn.getresponse()
    first = resp.read(MIB)
    g.send_signal(signal.SIGTERM)
    rest = resp.read()
    conn.close()
    assert first + rest == body_of(3 * MIB, "json")
    assert g.wait_exit(15) == 0
