"""The gateway's own server side for plain HTTP (gateway/worker.c, "own server side";
requests parsed by gateway/http1.c): what a client sees of it on the wire.

- Every request it cannot take is answered with the contract's JSON error (status,
  X-Request-Id equal to the body's request_id, Connection: close) and the
  connection is closed; the upstream sees none of them.
- A Content-Length over max_body_bytes is refused before the body is sent.
- Expect: 100-continue gets "100 Continue" once the head is in, then the answer.
- Requests of every framing pipelined on one connection are answered in order.
- HTTP/1.0: closed after the answer unless keep-alive was asked, and then kept.
- A client that resets its connection while the upstream is still answering
  leaves the gateway serving (and, on the sanitizer build, without a report).
- GATEWAY_OWN_HTTP=0 (evhttp's server side) still proxies and pipelines.

Every gateway and upstream is stopped by its fixture, and stop() fails on a
sanitizer report; every socket wait has a deadline."""

import json
import socket
import struct
import time

import pytest

from harness import gateway_config, peer_closed, raw_connect, upstream_config, wait_until

HOST = b"Host: 127.0.0.1\r\n"


@pytest.fixture(scope="module")
def env(module_stack):
    class Env:
        pass
    e = Env()
    e.up = module_stack.upstream()
    e.gw = module_stack.gateway(gateway_config(
        {"up": upstream_config([e.up])},
        server={"workers": 1, "max_body_bytes": "4KiB", "max_header_bytes": "4KiB", "read_timeout": "2s"}))
    return e


def read_until(sock, predicate, timeout=5.0):
    """Read until predicate(buffer) holds, EOF or the deadline; returns (buffer, eof)."""
    buf = b""
    deadline = time.monotonic() + timeout
    while not predicate(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            return buf, False
        sock.settimeout(left)
        try:
            got = sock.recv(65536)
        except socket.timeout:
            return buf, False
        except (ConnectionResetError, BrokenPipeError):
            return buf, True
        if not got:
            return buf, True
        buf += got
    return buf, False


def split_answers(buf):
    """Parse consecutive HTTP answers (Content-Length framed) out of buf:
    [(status, {lower-name: value}, body)], and what is left."""
    out = []
    while b"\r\n\r\n" in buf:
        head, rest = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        if len(rest) < n:
            break
        out.append((status, headers, rest[:n]))
        buf = rest[n:]
    return out, buf


def one_answer(port, raw, timeout=5.0):
    """Send raw on a new connection: (status, headers, body, closed-after)."""
    with raw_connect(port) as s:
        s.sendall(raw)
        buf, eof = read_until(s, lambda b: split_answers(b)[0], timeout)
        answers, _ = split_answers(buf)
        assert answers, "no answer to %r; got %r" % (raw[:80], buf[:300])
        closed = eof or peer_closed(s, 2.0)
        return answers[0] + (closed,)


MALFORMED = {
    "http2-version": (b"GET /own/v HTTP/2.0\r\n" + HOST + b"\r\n", 505),
    "http09-version": (b"GET /own/v HTTP/0.9\r\n\r\n", 505),
    "unknown-method": (b"BREW /own/m HTTP/1.1\r\n" + HOST + b"\r\n", 501),
    "te-and-length": (b"POST /own/s HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
                      b"0\r\n\r\n", 400),
    "te-not-chunked": (b"POST /own/s HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    "te-gzip-chunked": (b"POST /own/s HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                        501),
    "te-in-http10": (b"POST /own/s HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "two-lengths": (b"POST /own/s HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    "bad-chunk-size": (b"POST /own/s HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "obs-fold": (b"GET /own/f HTTP/1.1\r\n" + HOST + b"X-A: a\r\n  b\r\n\r\n", 400),
    "space-in-name": (b"GET /own/n HTTP/1.1\r\n" + HOST + b"X A: b\r\n\r\n", 400),
    "expectation": (b"GET /own/e HTTP/1.1\r\n" + HOST + b"Expect: tea\r\n\r\n", 417),
    "header-over-twice-limit": (b"GET /own/h HTTP/1.1\r\n" + HOST + b"X-Big: " + b"h" * 9000 + b"\r\n\r\n", 431),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_request_gets_json_error_and_close(env, kind):
    raw, want = MALFORMED[kind]
    before = len(env.up.seen(prefix="/own/"))
    status, headers, body, closed = one_answer(env.gw.port, raw)
    assert status == want, "%s: %d %r" % (kind, status, body[:200])
    assert headers.get("content-type", "").startswith("application/json"), headers
    doc = json.loads(body)
    assert doc["status"] == want and doc["error"], doc
    assert doc["request_id"] == headers.get("x-request-id") and len(doc["request_id"]) == 32, (doc, headers)
    assert headers.get("connection") == "close", headers
    assert headers.get("date"), headers
    assert closed, "%s: the connection stayed open after the error" % kind
    assert len(env.up.seen(prefix="/own/")) == before, "the upstream saw a refused request"


def test_length_over_limit_refused_before_the_body(env):
    """413 as soon as the head is in: the client has not sent a body byte."""
    with raw_connect(env.gw.port) as s:
        s.sendall(b"POST /own/big HTTP/1.1\r\n" + HOST + b"Content-Length: 100000\r\n\r\n")
        buf, _ = read_until(s, lambda b: split_answers(b)[0], 5.0)
        answers, _ = split_answers(buf)
        assert answers and answers[0][0] == 413, buf[:300]
        assert peer_closed(s, 2.0)
    assert env.up.count(path="/own/big") == 0


def test_expect_100_continue(env):
    body = b"x" * 1000
    with raw_connect(env.gw.port) as s:
        s.sendall(b"PUT /own/echo HTTP/1.1\r\n" + HOST + b"Expect: 100-continue\r\nContent-Length: 1000\r\n\r\n")
        interim, _ = read_until(s, lambda b: b"\r\n\r\n" in b, 5.0)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim[:200]
        rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        s.sendall(body)
        buf, _ = read_until(s, lambda b: split_answers(rest + b)[0], 5.0)
        answers, _ = split_answers(rest + buf)
        assert answers and answers[0][0] == 200, (rest + buf)[:300]
        doc = json.loads(answers[0][2])
        assert doc["method"] == "PUT" and doc["body_len"] == 1000, doc
    # Without the expectation, no interim answer.
    with raw_connect(env.gw.port) as s:
        s.sendall(b"PUT /own/echo HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nabc")
        buf, _ = read_until(s, lambda b: split_answers(b)[0], 5.0)
        assert buf.startswith(b"HTTP/1.1 200 "), buf[:200]


def test_pipelined_requests_of_every_framing_answered_in_order(env):
    chunked = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    raw = (b"GET /own/p1/echo HTTP/1.1\r\n" + HOST + b"\r\n"
           b"POST /own/p2/echo HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nabcde"
           b"\r\n"  # an empty line between requests is skipped (RFC 9112 2.2)
           b"PATCH /own/p3/echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + chunked +
           b"HEAD /own/p4/echo HTTP/1.1\r\n" + HOST + b"\r\n"
           b"DELETE /own/p5/echo HTTP/1.1\r\n" + HOST + b"\r\n")
    with raw_connect(env.gw.port) as s:
        s.sendall(raw)
        # HEAD's answer has a Content-Length but no body: read by hand.
        buf, _ = read_until(s, lambda b: b.count(b"HTTP/1.1 ") >= 5 and b.endswith(b"}"), 5.0)
    heads = [h for h in buf.split(b"HTTP/1.1 ")[1:]]
    assert len(heads) == 5, buf[:2000]
    assert all(h.startswith(b"200 ") for h in heads), [h[:20] for h in heads]
    docs = [json.loads(h.split(b"\r\n\r\n", 1)[1]) for h in heads if h.split(b"\r\n\r\n", 1)[1]]
    assert [(d["method"], d["path"], d["body_len"]) for d in docs] == [
        ("GET", "/own/p1/echo", 0), ("POST", "/own/p2/echo", 5), ("PATCH", "/own/p3/echo", 11),
        ("DELETE", "/own/p5/echo", 0)], docs
    assert heads[3].split(b"\r\n\r\n", 1)[1] == b"", "HEAD answered with a body"
    patch = [r for r in env.up.seen(path="/own/p3/echo")][-1]
    assert patch.body == b"hello world", patch.body


def test_http10_keep_alive_only_when_asked(env):
    status, headers, body, closed = one_answer(env.gw.port, b"GET /own/h10/echo HTTP/1.0\r\n\r\n")
    assert status == 200 and closed, (status, headers)
    with raw_connect(env.gw.port) as s:
        for i in range(3):
            s.sendall(b"GET /own/h10/echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            buf, eof = read_until(s, lambda b: split_answers(b)[0], 5.0)
            answers, _ = split_answers(buf)
            assert answers and answers[0][0] == 200 and not eof, (i, buf[:300])
            assert answers[0][1].get("connection", "").lower() == "keep-alive", answers[0][1]
            assert buf.startswith(b"HTTP/1.0 200 "), buf[:40]


def test_client_reset_while_upstream_answers(env):
    """The upstream takes 300 ms; the client resets after 50. The gateway drops
    the answer (its request was let go) and goes on serving."""
    for i in range(5):
        s = raw_connect(env.gw.port)
        s.sendall(b"GET /own/reset%d/delay/300 HTTP/1.1\r\n" % i + HOST + b"\r\n")
        time.sleep(0.05)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    wait_until(lambda: all(env.up.count(path="/own/reset%d/delay/300" % i) == 1 for i in range(5)), 5.0,
               "the upstream did not see the five requests")
    time.sleep(0.4)  # their answers arrive at the gateway, for clients that are gone
    status, headers, body, closed = one_answer(env.gw.port, b"GET /own/after/echo HTTP/1.1\r\n" + HOST +
                                               b"Connection: close\r\n\r\n")
    assert status == 200 and closed


@pytest.mark.parametrize("own", ["1", "0"])
def test_proxy_and_pipelining_either_server_side(stack, own):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": upstream_config([up])}, server={"workers": 1}),
                       env={"GATEWAY_OWN_HTTP": own})
    with raw_connect(gw.port) as s:
        s.sendall(b"".join(b"GET /either/%d/echo HTTP/1.1\r\n" % i + HOST + b"\r\n" for i in range(20)))
        buf, _ = read_until(s, lambda b: len(split_answers(b)[0]) >= 20, 10.0)
    answers, _ = split_answers(buf)
    assert [json.loads(a[2])["path"] for a in answers] == ["/either/%d/echo" % i for i in range(20)]
    assert all(a[0] == 200 and len(a[1].get("x-request-id", "")) == 32 for a in answers)


def test_error_while_the_body_still_arrives_is_read_by_the_client(env):
    """A chunked body over the limit, sent whole before the client reads (as
    most clients do): the 413 went while the body was still arriving. The
    gateway reads and drops the rest before closing (a close with unread bytes
    is a reset, which destroys the answer before the client reads it): every
    try gets its 413."""
    piece = b"%x\r\n%s\r\n" % (8192, b"b" * 8192)
    send_errors = []
    for i in range(10):
        with raw_connect(env.gw.port, timeout=10) as s:
            try:
                s.sendall(b"POST /own/linger%d HTTP/1.1\r\n" % i + HOST + b"Transfer-Encoding: chunked\r\n\r\n")
                for _ in range(128):  # 1 MiB against a 4 KiB limit
                    s.sendall(piece)
                s.sendall(b"0\r\n\r\n")
            except OSError as e:  # a reset: what a client like requests reports instead of the answer
                send_errors.append("try %d: %r" % (i, e))
            buf, _ = read_until(s, lambda b: split_answers(b)[0], 5.0)
        answers, _ = split_answers(buf)
        assert answers and answers[0][0] == 413, "try %d: %r" % (i, buf[:200])
    assert not send_errors, "the gateway reset connections whose body was still arriving: %s" % send_errors
    assert env.up.count(prefix="/own/linger") == 0


@pytest.mark.parametrize("raw,want", [(b"GET /own/v HTTP/2.0\r\n" + HOST + b"\r\n", 505),
                                      (b"GET /own/n HTTP/1.1\r\n" + HOST + b"X A: b\r\n\r\n", 400)])
def test_malformed_request_then_half_close_still_answered(env, raw, want):
    """The client sends a malformed request and shuts its side: the error in
    what arrived is answered all the same (only a request cut short by the
    end of stream closes without one)."""
    for i in range(10):
        with raw_connect(env.gw.port) as s:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            buf, eof = read_until(s, lambda b: split_answers(b)[0], 5.0)
            answers, _ = split_answers(buf)
            assert answers and answers[0][0] == want, "try %d: %r" % (i, buf[:200])
    # Cut short by the end: closed without an answer.
    with raw_connect(env.gw.port) as s:
        s.sendall(b"GET /own/cut HTTP/1.1\r\nHo")
        s.shutdown(socket.SHUT_WR)
        buf, eof = read_until(s, lambda b: False, 3.0)
        assert eof and buf == b"", buf[:200]


def test_connect_is_405_with_allow(env):
    status, headers, body, closed = one_answer(env.gw.port, b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n")
    assert status == 405, (status, body[:200])
    assert headers.get("allow"), headers
    assert closed


def test_slow_uploader_over_the_limit_gets_its_413(env):
    """A Content-Length over the limit, sent slowly (about 3 s at 100 KiB/s)
    before the client reads: the linger goes on while the client still sends,
    so its sends do not fail and it reads its 413."""
    with raw_connect(env.gw.port, timeout=10) as s:
        s.sendall(b"POST /own/slow HTTP/1.1\r\n" + HOST + b"Content-Length: 307200\r\n\r\n")
        chunk = b"s" * 10240
        for _ in range(30):
            s.sendall(chunk)  # a reset would raise here
            time.sleep(0.1)
        buf, _ = read_until(s, lambda b: split_answers(b)[0], 5.0)
    answers, _ = split_answers(buf)
    assert answers and answers[0][0] == 413, buf[:200]
