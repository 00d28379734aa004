"""Response compression: Accept-Encoding negotiation, gzip and brotli bodies, and
the rules for when an answer is (not) compressed.

One gateway for most of the file, with the `compression:` section below, in front
of one test upstream whose /respond endpoint answers a body, content type, status
and headers of the test's choosing (upstream.py). Requests go through raw
http.client with no Accept-Encoding of its own, so nothing is decoded on the way:
the tests see the bytes the gateway sent and decode them themselves, gzip with
zlib and brotli through ctypes on libbrotlidec (Python has no brotli module here).

Checked: the negotiation table (q-values, q=0 refusals, `*`, identity, x-gzip,
case and whitespace, server preference breaking ties), bodies of many sizes that
decode byte-equal to the identity body (compressible JSON-like and incompressible
random bytes; Content-Length and chunked upstream answers), already-encoded
answers passed through byte-exact, clients that accept no coding, the answers
that must not be compressed (HEAD, 204, 206/Content-Range, 304, no-transform, a
type not listed, a body under min_bytes), Vary (added, merged with the
upstream's), ETag weakening, Content-Length, keep-alive framing, a gateway
without a compression section, other server preferences and levels, and a SQL
route's JSON answer.
"""

import ctypes
import http.client
import urllib.parse
import zlib

import pytest

from harness import gateway_config, upstream_config, wait_until
from pg import postgres, postgres_section, sql_route  # noqa: F401 - postgres is a fixture
from upstream import chunked_body, respond_body, respond_body_gzipped

TYPES = ["application/json", "text/*", "application/javascript", "image/svg+xml"]
COMPRESSION = {"algorithms": ["br", "gzip"], "min_bytes": 1024, "types": TYPES, "brotli_quality": 5,
               "gzip_level": 6}
# 8 MiB bodies and brotli on a sanitizer build: generous timeouts.
SERVER = {"request_timeout": "30s", "read_timeout": "30s"}
KIB = 1024
MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# Decoding

class _Brotli:
    """BrotliDecoderDecompressStream from libbrotlidec.so.1, through ctypes."""

    SUCCESS, NEEDS_MORE_INPUT, NEEDS_MORE_OUTPUT = 1, 2, 3

    def __init__(self):
        lib = ctypes.CDLL("libbrotlidec.so.1")
        self.create = lib.BrotliDecoderCreateInstance
        self.create.restype = ctypes.c_void_p
        self.create.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.destroy = lib.BrotliDecoderDestroyInstance
        self.destroy.restype = None
        self.destroy.argtypes = [ctypes.c_void_p]
        self.stream = lib.BrotliDecoderDecompressStream
        self.stream.restype = ctypes.c_int
        u8p = ctypes.POINTER(ctypes.c_uint8)
        self.stream.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(u8p),
                                ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(u8p),
                                ctypes.POINTER(ctypes.c_size_t)]

    def decompress(self, data):
        """The whole decoded stream; fails on a corrupt or truncated stream or on
        bytes after its end."""
        state = self.create(None, None, None)
        assert state, "BrotliDecoderCreateInstance failed"
        try:
            u8p = ctypes.POINTER(ctypes.c_uint8)
            inbuf = (ctypes.c_uint8 * max(1, len(data))).from_buffer_copy(data or b"\0")
            next_in = ctypes.cast(inbuf, u8p)
            avail_in = ctypes.c_size_t(len(data))
            chunk = 1 << 20
            outbuf = (ctypes.c_uint8 * chunk)()
            out = bytearray()
            while True:
                next_out = ctypes.cast(outbuf, u8p)
                avail_out = ctypes.c_size_t(chunk)
                rc = self.stream(state, ctypes.byref(avail_in), ctypes.byref(next_in), ctypes.byref(avail_out),
                                 ctypes.byref(next_out), None)
                out += bytes(outbuf[:chunk - avail_out.value])
                if rc == self.SUCCESS:
                    assert avail_in.value == 0, "%d bytes after the end of the brotli stream" % avail_in.value
                    return bytes(out)
                if rc == self.NEEDS_MORE_OUTPUT:
                    continue
                if rc == self.NEEDS_MORE_INPUT:
                    raise AssertionError("truncated brotli stream (%d bytes, %d decoded)" % (len(data), len(out)))
                raise AssertionError("corrupt brotli stream (%d bytes, decoder result %d)" % (len(data), rc))
        finally:
            self.destroy(state)


BROTLI = _Brotli()


def gunzip(data):
    """One whole gzip member, nothing after it."""
    assert data[:2] == b"\x1f\x8b", "not a gzip stream: starts %r" % data[:8]
    d = zlib.decompressobj(wbits=31)
    out = d.decompress(data) + d.flush()
    assert d.eof, "truncated gzip stream (%d bytes)" % len(data)
    assert not d.unused_data, "%d bytes after the end of the gzip stream" % len(d.unused_data)
    return out


def decode(ans):
    """The answer's body with its content coding undone."""
    codings = ans.codings
    if not codings:
        return ans.body
    assert len(codings) == 1, "more than one content coding: %r" % ans.headers.get_all("Content-Encoding")
    if codings[0] == "gzip":
        return gunzip(ans.body)
    if codings[0] == "br":
        return BROTLI.decompress(ans.body)
    raise AssertionError("unexpected Content-Encoding %r" % codings[0])


# ---------------------------------------------------------------------------
# Requests

def _tokens(values):
    out = []
    for v in values or ():
        out += [t.strip().lower() for t in v.split(",") if t.strip()]
    return out


class Answer:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # http.client.HTTPMessage: every line kept
        self.body = body

    @property
    def codings(self):
        """Content-Encoding tokens, lower-cased, identity left out."""
        return [t for t in _tokens(self.headers.get_all("Content-Encoding")) if t != "identity"]

    @property
    def coding(self):
        c = self.codings
        return c[0] if c else "identity"

    @property
    def vary(self):
        return _tokens(self.headers.get_all("Vary"))

    def __repr__(self):
        return "<%d %s, %d body bytes>" % (self.status, dict(self.headers.items()), len(self.body))


def send(conn, path, ae=None, method="GET", headers=()):
    """One request on an open http.client connection. `ae`: None (no
    Accept-Encoding), a string, or a list (one header line each)."""
    conn.putrequest(method, path, skip_accept_encoding=True)
    for v in ([] if ae is None else [ae] if isinstance(ae, str) else ae):
        conn.putheader("Accept-Encoding", v)
    for k, v in headers:
        conn.putheader(k, v)
    conn.endheaders()
    resp = conn.getresponse()
    body = resp.read()
    return Answer(resp.status, resp.msg, body)


def fetch(gw, path, ae=None, method="GET", headers=()):
    """One request on a connection of its own."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    try:
        return send(conn, path, ae, method, headers)
    finally:
        conn.close()


def respond(size=0, kind="json", ct=None, status=None, headers=(), gzip=False, chunked=False, piece=None,
            seed=None, prefix="/c"):
    """A path to the upstream's /respond with these choices."""
    q = [("size", size), ("kind", kind)]
    if ct is not None:
        q.append(("ct", ct))
    if status is not None:
        q.append(("status", status))
    for k, v in headers:
        q.append(("h", "%s:%s" % (k, v)))
    if gzip:
        q.append(("gzip", 1))
    if chunked:
        q.append(("chunked", 1))
    if piece:
        q.append(("piece", piece))
    if seed is not None:
        q.append(("seed", seed))
    return "%s/respond?%s" % (prefix, urllib.parse.urlencode(q))


def assert_identity(ans, expect_body, vary=None):
    """Not compressed: no Content-Encoding, the body as the upstream sent it."""
    assert ans.codings == [], "must not be compressed: %r" % ans
    assert ans.body == expect_body, "body changed: %d bytes, expected %d" % (len(ans.body), len(expect_body))
    if vary is True:
        assert "accept-encoding" in ans.vary, "Vary must name Accept-Encoding (the answer qualifies): %r" % ans
    elif vary is False:
        assert "accept-encoding" not in ans.vary, "no Vary: Accept-Encoding expected here: %r" % ans


def assert_compressed(ans, coding, expect_body, length=True, smaller=True):
    """Compressed with `coding`: Vary, Content-Length of the compressed bytes, and
    a body that decodes to exactly expect_body, smaller than it (a streamed
    answer is compressed as it passes, so it may come out larger: smaller=False)."""
    assert ans.codings == [coding], "expected Content-Encoding %s: %r" % (coding, ans)
    assert ans.headers.get_all("Content-Encoding") == [coding], \
        "one Content-Encoding line expected: %r" % ans.headers.get_all("Content-Encoding")
    assert "accept-encoding" in ans.vary, "a compressed answer needs Vary: Accept-Encoding: %r" % ans
    cl = ans.headers.get_all("Content-Length")
    if length:
        assert cl is not None, "no Content-Length on a compressed answer: %r" % ans
    if cl is not None:
        assert cl == [str(len(ans.body))], "Content-Length %r, %d compressed bytes came" % (cl, len(ans.body))
    got = decode(ans)
    assert got == expect_body, "decoded %s body differs: %d bytes, expected %d%s" % (
        coding, len(got), len(expect_body), "" if len(got) != len(expect_body) else
        " (first difference at %d)" % next(i for i, (a, b) in enumerate(zip(got, expect_body)) if a != b))
    if smaller:
        assert len(ans.body) < len(expect_body), "compressed but not smaller"


# ---------------------------------------------------------------------------
# Fixtures

class Env:
    pass


def compressing_gateway(stack, up, compression=COMPRESSION, name=None, **sections):
    sec = dict(sections)
    if compression is not None:
        sec["compression"] = compression
    cfg = gateway_config({"up": upstream_config([up], timeout="20s", keepalive=8)}, server=SERVER, **sec)
    return stack.gateway(cfg, name=name)


@pytest.fixture(scope="module")
def env(module_stack):
    e = Env()
    e.up = module_stack.upstream("up")
    e.gw = compressing_gateway(module_stack, e.up)
    return e


# ---------------------------------------------------------------------------
# Negotiation

NEGOTIATION = [
    (None, "identity"),                       # absent header
    ("", "identity"),                         # empty: only identity acceptable
    ("gzip", "gzip"),
    ("br", "br"),
    ("gzip, deflate, br", "br"),              # equal q: server preference
    ("br, gzip", "br"),
    ("gzip;q=1, br;q=0.5", "gzip"),
    ("gzip;q=0.5, br;q=0.5", "br"),           # tie at 0.5: server preference
    ("br;q=0, *", "gzip"),
    ("gzip;q=0, *", "br"),
    ("*", "br"),
    ("*;q=0", "identity"),
    ("*;q=0.5, gzip;q=0.8", "gzip"),          # br gets *'s 0.5
    ("br;q=0, gzip;q=0, *", "identity"),
    ("GZIP", "gzip"),                         # codings are case-insensitive
    ("Br", "br"),
    ("gzip;Q=0.5, br;q=0.4", "gzip"),         # so is the q parameter's name
    ("  gzip ;  q=0.8 ,\tbr ; q=0.9  ", "br"),  # OWS around elements and ';'
    ("gzip;q=0.800, br;q=0.9", "br"),
    ("x-gzip", "gzip"),                       # x-gzip is gzip
    ("X-GZIP;q=0.9, br;q=0.8", "gzip"),
    ("identity", "identity"),
    ("identity;q=0, gzip", "gzip"),
    ("identity;q=1, gzip;q=0.1", "gzip"),     # identity does not compete (encoding.h)
    ("gzip;q=0", "identity"),
    ("gzip;q=0, br;q=0", "identity"),
    ("gzip;q=0.000", "identity"),
    ("gzip;q=0.001, br;q=0", "gzip"),         # any q > 0 is acceptable
    ("deflate", "identity"),                  # not one we do
    ("compress, deflate;q=0.5", "identity"),
    ("br;q=2, gzip", "gzip"),                 # malformed q: that element is ignored
    ("br;level=5, gzip;q=0.5", "br"),         # other parameters are skipped
    (",, gzip ,", "gzip"),                    # empty list elements
]


@pytest.mark.parametrize("ae,expect", NEGOTIATION, ids=[repr(a) for a, _ in NEGOTIATION])
def test_negotiation(env, ae, expect):
    path = respond(8 * KIB)
    ans = fetch(env.gw, path, ae)
    assert ans.status == 200, ans
    body = respond_body(8 * KIB)
    if expect == "identity":
        assert_identity(ans, body, vary=True)
    else:
        assert_compressed(ans, expect, body)


def test_negotiation_identity_refused(env):
    """identity;q=0 with no coding acceptable: RFC 9110 lets the server answer
    identity anyway (or 406); never a coding the client did not accept."""
    for ae in ("identity;q=0", "identity;q=0, deflate", "*;q=0"):
        ans = fetch(env.gw, respond(8 * KIB), ae)
        assert ans.status in (200, 406), (ae, ans)
        assert ans.codings == [], (ae, ans)
        if ans.status == 200:
            assert ans.body == respond_body(8 * KIB), ae


def test_accept_encoding_over_several_lines(env):
    """Several Accept-Encoding lines are one comma-separated list (RFC 9110 §5.3)."""
    body = respond_body(8 * KIB)
    ans = fetch(env.gw, respond(8 * KIB), ["identity", "br"])
    assert_compressed(ans, "br", body)
    ans = fetch(env.gw, respond(8 * KIB), ["br;q=0", "gzip"])
    assert_compressed(ans, "gzip", body)
    ans = fetch(env.gw, respond(8 * KIB), ["gzip;q=0.5", "br;q=0"])
    assert_compressed(ans, "gzip", body)


# ---------------------------------------------------------------------------
# Bodies of every size, both codings

SIZES = [0, 1, 1023, 1024, 1025, 64 * KIB, MIB, 8 * MIB]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("coding", ["gzip", "br"])
@pytest.mark.parametrize("kind", ["json", "random"])
def test_body_round_trip(env, kind, coding, size):
    body = respond_body(size, kind)
    ans = fetch(env.gw, respond(size, kind), coding)
    assert ans.status == 200, ans
    streamed = size > MIB  # over the 1 MiB buffer: compressed as it passes, chunked
    if size < 1024:
        assert_identity(ans, body, vary=False)           # under min_bytes: does not qualify
    elif kind == "random" and not streamed:
        assert_identity(ans, body, vary=True)            # qualifies, but does not shrink
    else:
        # A streamed answer is committed to its coding with its head, before
        # anyone knows whether it shrinks (as nginx's gzip does).
        assert_compressed(ans, coding, body, length=not streamed, smaller=kind == "json")
    if not ans.codings:
        assert ans.headers.get_all("Content-Length") == [str(size)], ans
    if streamed:
        assert ans.headers.get_all("Content-Length") is None, ans


@pytest.mark.parametrize("size,piece", [(0, 4096), (1023, 100), (1024, 1000), (64 * KIB, 4096),
                                        (MIB, 65536), (MIB + 7, 1)])
@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_chunked_upstream_answer(env, coding, size, piece):
    if piece == 1:
        size, piece = 5000, 1  # a chunk per byte: keep it small
    body = respond_body(size)
    ans = fetch(env.gw, respond(size, chunked=True, piece=piece), coding)
    assert ans.status == 200, ans
    if size < 1024:
        assert_identity(ans, body, vary=False)
    else:
        assert_compressed(ans, coding, body, length=False)


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_chunked_endpoint_text_plain(env, coding):
    """The upstream's own /chunked (text/plain, matched by text/*)."""
    body = chunked_body(600)
    assert len(body) > 1024
    ans = fetch(env.gw, "/c/chunked?n=600", coding)
    assert_compressed(ans, coding, body, length=False)


def test_keep_alive_framing(env):
    """Compressed and identity answers in turn on one connection: each framed right."""
    conn = http.client.HTTPConnection("127.0.0.1", env.gw.port, timeout=60)
    try:
        plan = [(64 * KIB, "json", "gzip"), (64 * KIB, "json", "br"), (64 * KIB, "json", None),
                (500, "json", "br"), (32 * KIB, "random", "gzip"), (MIB, "json", "br"),
                (2000, "json", "gzip"), (0, "json", "gzip"), (70000, "json", "br, gzip")]
        for i, (size, kind, ae) in enumerate(plan):
            body = respond_body(size, kind, seed=i)
            ans = send(conn, respond(size, kind, seed=i), ae)
            assert ans.status == 200, (i, ans)
            assert decode(ans) == body, "request %d on the connection: body differs" % i
            want = "identity" if ae is None or size < 1024 or kind == "random" else ae.split(",")[0]
            assert ans.coding == want, (i, ae, ans)
    finally:
        conn.close()


# ---------------------------------------------------------------------------
# Already encoded by the upstream

@pytest.mark.parametrize("ae", [None, "gzip", "br", "br, gzip", "identity", "*"])
def test_already_gzip_passes_byte_exact(env, ae):
    raw = respond_body_gzipped(64 * KIB)
    ans = fetch(env.gw, respond(64 * KIB, gzip=True, headers=[("Content-Encoding", "gzip"), ("ETag", '"enc1"')]),
                ae)
    assert ans.status == 200, ans
    assert ans.headers.get_all("Content-Encoding") == ["gzip"], "the upstream's coding, once: %r" % ans
    assert ans.body == raw, "an encoded answer must pass byte-exact (%d bytes, expected %d)" % (
        len(ans.body), len(raw))
    assert ans.headers.get_all("Content-Length") == [str(len(raw))], ans
    assert ans.headers.get("ETag") == '"enc1"', "an untouched answer keeps its strong ETag: %r" % ans
    assert gunzip(ans.body) == respond_body(64 * KIB)


@pytest.mark.parametrize("ce", ["br", "deflate", "x-custom", "GZIP"])
def test_other_encoded_answers_pass_byte_exact(env, ce):
    """Whatever the upstream's coding (even one we cannot read), the bytes pass as they are."""
    raw = respond_body(20 * KIB)
    ans = fetch(env.gw, respond(20 * KIB, headers=[("Content-Encoding", ce)]), "br, gzip")
    assert ans.headers.get_all("Content-Encoding") == [ce], ans
    assert ans.body == raw


def test_already_gzip_chunked_passes_byte_exact(env):
    raw = respond_body_gzipped(MIB)
    ans = fetch(env.gw, respond(MIB, gzip=True, chunked=True, headers=[("Content-Encoding", "gzip")]), "br, gzip")
    assert ans.headers.get_all("Content-Encoding") == ["gzip"], ans
    assert ans.body == raw


def test_content_encoding_identity_is_not_an_encoding(env):
    """Content-Encoding: identity from the upstream does not stop compression."""
    body = respond_body(20 * KIB)
    ans = fetch(env.gw, respond(20 * KIB, headers=[("Content-Encoding", "identity")]), "gzip")
    assert ans.codings == ["gzip"], ans
    assert gunzip(ans.body) == body


def test_content_encoding_identity_line_dropped_when_compressed(env):
    """The upstream's "Content-Encoding: identity" line does not stay beside
    ours (two lines would read as the list "identity, gzip")."""
    ans = fetch(env.gw, respond(20 * KIB, headers=[("Content-Encoding", "identity")]), "gzip")
    assert ans.headers.get_all("Content-Encoding") == ["gzip"], ans.headers.get_all("Content-Encoding")


def test_accept_ranges_dropped_when_compressed(env):
    """Byte ranges would refer to the identity body."""
    ans = fetch(env.gw, respond(20 * KIB, headers=[("Accept-Ranges", "bytes")]), "gzip")
    assert ans.codings == ["gzip"] and ans.headers.get("Accept-Ranges") is None, ans
    plain = fetch(env.gw, respond(20 * KIB, headers=[("Accept-Ranges", "bytes")]), None)
    assert plain.headers.get("Accept-Ranges") == "bytes", plain


def test_long_refusal_line_is_not_cut_off(env):
    """Several Accept-Encoding lines too long to join whole: a refusal may be in
    the part left out, so nothing is compressed (review finding)."""
    filler = ", ".join("x%d" % i for i in range(400))
    ans = fetch(env.gw, respond(20 * KIB), ["gzip;q=0, br;q=0, " + filler, "gzip"])
    assert ans.codings == [], "a client refusing gzip got %r" % ans.codings


def test_no_transform_late_in_a_long_cache_control(env):
    """no-transform after 500+ bytes of Cache-Control still counts."""
    cc = "x=%s, no-transform" % ("a" * 600)
    ans = fetch(env.gw, respond(20 * KIB, headers=[("Cache-Control", cc)]), "gzip")
    assert ans.codings == [], ans


def test_two_content_types_not_compressed(env):
    """Which type is it? Left alone."""
    ans = fetch(env.gw, respond(20 * KIB, ct="image/png", headers=[("Content-Type", "application/json")]), "gzip")
    assert ans.codings == [], ans


# ---------------------------------------------------------------------------
# Clients that accept no coding

@pytest.mark.parametrize("ae", [None, "", "identity", "identity;q=1", "gzip;q=0", "gzip;q=0, br;q=0",
                                "deflate", "identity, *;q=0", "br;q=0, gzip;q=0, identity;q=0.5"])
@pytest.mark.parametrize("size", [2 * KIB, MIB])
def test_client_without_gzip_gets_identity(env, ae, size):
    body = respond_body(size)
    ans = fetch(env.gw, respond(size), ae)
    assert ans.status == 200, ans
    assert_identity(ans, body, vary=True)
    assert ans.headers.get_all("Content-Length") == [str(size)], ans


# ---------------------------------------------------------------------------
# Answers that are not compressed

def test_head_not_compressed(env):
    ans = fetch(env.gw, respond(64 * KIB), "gzip, br", method="HEAD")
    assert ans.status == 200, ans
    assert ans.codings == [], ans
    assert ans.body == b""
    assert ans.headers.get("Content-Length") == str(64 * KIB), "HEAD keeps the identity length: %r" % ans
    assert "Accept-Encoding" in (ans.headers.get("Vary") or ""), "HEAD has the GET's Vary: %r" % ans


@pytest.mark.parametrize("status", [204, 304])
def test_no_body_statuses_not_compressed(env, status):
    ans = fetch(env.gw, respond(64 * KIB, status=status, headers=[("ETag", '"s1"')]), "gzip, br")
    assert ans.status == status, ans
    assert ans.codings == [], ans
    assert ans.body == b""
    # Nothing says this client holds a compressed representation (it sent no
    # If-None-Match with the weakened tag): the validator passes as it came.
    assert ans.headers.get("ETag") == '"s1"', "an uncompressed answer keeps its strong ETag: %r" % ans


def test_304_keeps_strong_etag_for_identity_clients(env):
    ans = fetch(env.gw, respond(64 * KIB, status=304, headers=[("ETag", '"s1"')]), None)
    assert ans.status == 304, ans
    assert ans.headers.get("ETag") == '"s1"', ans


# A 304 repeats the ETag and Vary of the 200 the client holds (RFC 9110
# 15.4.5). The client revalidating a compressed 200 asks with the weakened tag
# it was given; one that holds the identity 200 (an uncompressible type, a body
# under min_bytes, no-transform, an encoded answer, or no coding accepted) asks
# with the strong one. Only the first gets W/ and Vary back.
@pytest.mark.parametrize("inm,ct,extra,etag,vary", [
    ('W/"s1"', None, [], 'W/"s1"', True),
    ('"x", W/"s1"', None, [], 'W/"s1"', True),
    ('W/"s1"', None, [("Vary", "Accept-Encoding")], 'W/"s1"', True),  # already there: not twice
    ('"s1"', None, [], '"s1"', False),
    ('"s1"', "image/png", [], '"s1"', False),
    ('"s1"', None, [("Cache-Control", "no-transform")], '"s1"', False),
    ('"s1"', None, [("Content-Encoding", "gzip")], '"s1"', False),
    (None, None, [], '"s1"', False),
])
def test_304_repeats_what_the_client_holds(env, inm, ct, extra, etag, vary):
    headers = [("ETag", '"s1"')] + extra
    ans = fetch(env.gw, respond(64 * KIB, status=304, ct=ct, headers=headers), "gzip, br",
                headers=[("If-None-Match", inm)] if inm else ())
    assert ans.status == 304, ans
    assert ans.headers.get("ETag") == etag, ans
    listed = ans.vary.count("accept-encoding")
    assert listed == (1 if vary else 0), "Vary: Accept-Encoding %s: %r" % ("once" if vary else "absent", ans)


def test_partial_content_not_compressed(env):
    body = respond_body(64 * KIB)
    ans = fetch(env.gw, respond(64 * KIB, status=206, headers=[("Content-Range", "bytes 0-65535/200000")]),
                "gzip, br")
    assert ans.status == 206, ans
    assert_identity(ans, body)
    assert ans.headers.get("Content-Range") == "bytes 0-65535/200000"


def test_content_range_on_200_not_compressed(env):
    body = respond_body(64 * KIB)
    ans = fetch(env.gw, respond(64 * KIB, headers=[("Content-Range", "bytes 0-65535/65536")]), "br")
    assert_identity(ans, body)


@pytest.mark.parametrize("cc", ["no-transform", "public, no-transform", "max-age=60,No-Transform"])
def test_no_transform_not_compressed(env, cc):
    body = respond_body(64 * KIB)
    ans = fetch(env.gw, respond(64 * KIB, headers=[("Cache-Control", cc)]), "gzip, br")
    assert_identity(ans, body)
    assert ans.headers.get("Cache-Control") == cc


def test_other_cache_control_still_compressed(env):
    body = respond_body(64 * KIB)
    ans = fetch(env.gw, respond(64 * KIB, headers=[("Cache-Control", "public, max-age=60")]), "br")
    assert_compressed(ans, "br", body)


TYPE_CASES = [
    ("application/json", True),
    ("application/json; charset=utf-8", True),
    ("Application/JSON", True),
    ("application/json ;charset=UTF-8", True),
    ("text/plain", True),
    ("text/html; charset=utf-8", True),
    ("TEXT/CSS", True),
    ("application/javascript", True),
    ("image/svg+xml", True),
    ("image/png", False),
    ("application/octet-stream", False),
    ("application/jsonx", False),
    ("application/json-seq", False),
    ("textual/plain", False),     # text/* is the whole type "text"
    ("application/x-javascript", False),
    ("", False),                  # no Content-Type at all
]


@pytest.mark.parametrize("ct,match", TYPE_CASES, ids=[c or "none" for c, _ in TYPE_CASES])
def test_content_type_matching(env, ct, match):
    body = respond_body(16 * KIB)
    ans = fetch(env.gw, respond(16 * KIB, ct=ct), "gzip")
    assert ans.status == 200, ans
    if match:
        assert_compressed(ans, "gzip", body)
    else:
        assert_identity(ans, body, vary=False)


@pytest.mark.parametrize("size,qualifies", [(1023, False), (1024, True)])
def test_min_bytes_boundary_and_vary(env, size, qualifies):
    """Under min_bytes: no compression and no Vary, even for a client that
    accepts nothing; from min_bytes on: Vary for every client."""
    body = respond_body(size)
    for ae in (None, "identity", "gzip", "br"):
        ans = fetch(env.gw, respond(size), ae)
        if qualifies and ae in ("gzip", "br"):
            assert_compressed(ans, ae, body)
        else:
            assert_identity(ans, body, vary=qualifies)


@pytest.mark.parametrize("status", [201, 203, 301, 404, 410, 500, 503])
def test_other_statuses_with_a_body_compressed(env, status):
    body = respond_body(16 * KIB)
    ans = fetch(env.gw, respond(16 * KIB, status=status), "br")
    assert ans.status == status, ans
    assert_compressed(ans, "br", body)


# ---------------------------------------------------------------------------
# Vary and ETag

@pytest.mark.parametrize("ae", [None, "gzip", "br"])
def test_vary_merged_with_upstream_vary(env, ae):
    body = respond_body(16 * KIB)
    ans = fetch(env.gw, respond(16 * KIB, headers=[("Vary", "Origin")]), ae)
    assert "origin" in ans.vary, "the upstream's Vary must stay: %r" % ans
    assert ans.vary.count("accept-encoding") == 1, "Vary must name Accept-Encoding once: %r" % ans
    assert decode(ans) == body


@pytest.mark.parametrize("vary", ["Accept-Encoding", "accept-encoding", "Origin, Accept-Encoding",
                                  "Accept-Encoding,Origin"])
def test_vary_not_duplicated(env, vary):
    body = respond_body(16 * KIB)
    ans = fetch(env.gw, respond(16 * KIB, headers=[("Vary", vary)]), "gzip")
    assert_compressed(ans, "gzip", body)
    assert ans.vary.count("accept-encoding") == 1, "Vary names Accept-Encoding more than once: %r" % (
        ans.headers.get_all("Vary"),)


def test_vary_star_left_alone(env):
    body = respond_body(16 * KIB)
    ans = fetch(env.gw, respond(16 * KIB, headers=[("Vary", "*")]), "br")
    assert decode(ans) == body
    assert ans.codings in ([], ["br"]), ans
    assert ans.vary == ["*"], "Vary: * already covers Accept-Encoding: %r" % ans.headers.get_all("Vary")


@pytest.mark.parametrize("coding", ["gzip", "br"])
def test_strong_etag_weakened_when_compressed(env, coding):
    body = respond_body(16 * KIB)
    ans = fetch(env.gw, respond(16 * KIB, headers=[("ETag", '"v1-abc"')]), coding)
    assert_compressed(ans, coding, body)
    assert ans.headers.get_all("ETag") == ['W/"v1-abc"'], ans


def test_weak_etag_unchanged_when_compressed(env):
    body = respond_body(16 * KIB)
    ans = fetch(env.gw, respond(16 * KIB, headers=[("ETag", 'W/"v1-abc"')]), "gzip")
    assert_compressed(ans, "gzip", body)
    assert ans.headers.get_all("ETag") == ['W/"v1-abc"'], ans


@pytest.mark.parametrize("why", ["identity-client", "incompressible", "small", "type"])
def test_strong_etag_kept_when_not_compressed(env, why):
    size, kind, ct, ae = 16 * KIB, "json", None, "gzip"
    if why == "identity-client":
        ae = None
    elif why == "incompressible":
        kind = "random"
    elif why == "small":
        size = 100
    else:
        ct = "image/png"
    ans = fetch(env.gw, respond(size, kind, ct=ct, headers=[("ETag", '"v1-abc"')]), ae)
    assert_identity(ans, respond_body(size, kind))
    assert ans.headers.get_all("ETag") == ['"v1-abc"'], ans


# ---------------------------------------------------------------------------
# Other configurations

def test_no_compression_section_never_compresses(stack):
    up = stack.upstream("plain")
    gw = compressing_gateway(stack, up, compression=None)
    for size, kind, ct in ((64 * KIB, "json", None), (MIB, "json", "text/plain"), (2 * KIB, "json", None)):
        body = respond_body(size, kind)
        for ae in ("gzip", "br", "gzip, deflate, br", "*", "x-gzip"):
            ans = fetch(gw, respond(size, kind, ct=ct, headers=[("ETag", '"p"')]), ae)
            assert_identity(ans, body, vary=False)
            assert ans.headers.get("ETag") == '"p"'
    # Nor a chunked upstream answer.
    ans = fetch(gw, "/c/chunked?n=600", "gzip")
    assert_identity(ans, chunked_body(600), vary=False)


def test_empty_algorithms_turn_compression_off(stack):
    up = stack.upstream("off")
    gw = compressing_gateway(stack, up, compression=dict(COMPRESSION, algorithms=[]))
    body = respond_body(64 * KIB)
    for ae in ("gzip", "br", "*"):
        ans = fetch(gw, respond(64 * KIB), ae)
        assert_identity(ans, body)


def test_server_preference_gzip_first(stack):
    up = stack.upstream("pref")
    gw = compressing_gateway(stack, up, compression=dict(COMPRESSION, algorithms=["gzip", "br"]))
    body = respond_body(16 * KIB)
    for ae, want in (("gzip, br", "gzip"), ("br, gzip", "gzip"), ("*", "gzip"), ("br", "br"),
                     ("br;q=1, gzip;q=0.9", "br"), ("gzip;q=0, *", "br"), ("gzip;q=0.5, br;q=0.5", "gzip")):
        ans = fetch(gw, respond(16 * KIB), ae)
        assert ans.coding == want, (ae, ans)
        assert decode(ans) == body, ae


def test_gzip_only(stack):
    up = stack.upstream("gz")
    gw = compressing_gateway(stack, up, compression=dict(COMPRESSION, algorithms=["gzip"]))
    body = respond_body(16 * KIB)
    for ae, want in (("br", "identity"), ("br, gzip", "gzip"), ("*", "gzip"), ("gzip, br", "gzip")):
        ans = fetch(gw, respond(16 * KIB), ae)
        assert ans.coding == want, (ae, ans)
        assert decode(ans) == body, ae
        assert "accept-encoding" in ans.vary, (ae, ans)


@pytest.mark.parametrize("gzip_level,brotli_quality", [(1, 0), (9, 11)])
def test_levels(stack, gzip_level, brotli_quality):
    up = stack.upstream("lv")
    gw = compressing_gateway(stack, up, compression=dict(COMPRESSION, gzip_level=gzip_level,
                                                         brotli_quality=brotli_quality))
    body = respond_body(MIB)
    for coding in ("gzip", "br"):
        ans = fetch(gw, respond(MIB), coding)
        assert_compressed(ans, coding, body)


def test_min_bytes_zero_and_own_types(stack):
    up = stack.upstream("mb")
    gw = compressing_gateway(stack, up, compression=dict(COMPRESSION, min_bytes=0, types=["text/plain"]))
    # One byte qualifies (Vary) but cannot shrink: identity.
    ans = fetch(gw, respond(1, ct="text/plain"), "gzip")
    assert_identity(ans, respond_body(1), vary=True)
    ans = fetch(gw, respond(0, ct="text/plain"), "br")
    assert ans.codings == [] and ans.body == b"", ans
    # application/json is not in this gateway's types.
    ans = fetch(gw, respond(16 * KIB), "gzip")
    assert_identity(ans, respond_body(16 * KIB), vary=False)
    ans = fetch(gw, respond(300, ct="text/plain; charset=utf-8"), "br")
    assert_compressed(ans, "br", respond_body(300))


def test_max_bytes(stack):
    """Over max_bytes an answer passes as it is (no Vary: it does not qualify);
    at max_bytes it is still compressed."""
    up = stack.upstream("mx")
    gw = compressing_gateway(stack, up, compression=dict(COMPRESSION, max_bytes=64 * KIB))
    assert_compressed(fetch(gw, respond(64 * KIB), "br"), "br", respond_body(64 * KIB))
    ans = fetch(gw, respond(64 * KIB + 1), "br, gzip")
    assert_identity(ans, respond_body(64 * KIB + 1), vary=False)
    ans = fetch(gw, respond(64 * KIB + 1), "gzip", method="HEAD")
    assert ans.codings == [] and "accept-encoding" not in ans.vary, ans
    # max_bytes bounds what is compressed in one go; an answer that streams
    # (over 1 MiB) is compressed piece by piece whatever its size, and a HEAD
    # for it says so (Vary) as its GET does.
    big = 2 * MIB
    assert_compressed(fetch(gw, respond(big), "br"), "br", respond_body(big), length=False)
    ans = fetch(gw, respond(big), "gzip", method="HEAD")
    assert ans.codings == [] and "accept-encoding" in ans.vary and ans.body == b"", ans


def test_reload_turns_compression_on_off_and_changes_levels(stack):
    up = stack.upstream("rl")
    gw = compressing_gateway(stack, up, compression=None)
    body = respond_body(MIB)
    path = respond(MIB)
    assert_identity(fetch(gw, path, "gzip"), body, vary=False)
    cfg = gateway_config({"up": upstream_config([up], timeout="20s", keepalive=8)}, server=SERVER,
                         compression=dict(COMPRESSION, gzip_level=1))
    gw.write_config(cfg)
    gw.reload("success")
    fast = fetch(gw, path, "gzip")
    assert_compressed(fast, "gzip", body)
    gw.write_config(dict(cfg, compression=dict(COMPRESSION, gzip_level=9)))
    gw.reload("success")
    small = fetch(gw, path, "gzip")
    assert_compressed(small, "gzip", body)
    assert len(small.body) < len(fast.body), "gzip_level 9 after a reload: %d bytes, level 1 gave %d" % (
        len(small.body), len(fast.body))
    assert_compressed(fetch(gw, path, "br"), "br", body)
    gw.write_config(gateway_config({"up": upstream_config([up], timeout="20s", keepalive=8)}, server=SERVER))
    gw.reload("success")
    assert_identity(fetch(gw, path, "gzip, br"), body, vary=False)


def test_access_log_counts_bytes_sent(env):
    """The access log's bytes are the bytes that went out: the compressed length."""
    ans = fetch(env.gw, respond(64 * KIB, seed=77), "br")
    assert_compressed(ans, "br", respond_body(64 * KIB, seed=77))
    rid = ans.headers.get("X-Request-Id")
    assert rid, ans
    line = wait_until(lambda: [d for d in env.gw.access_log() if d.get("request_id") == rid], 5,
                      "access-log line for %s" % rid)[0]
    assert line.get("bytes") == len(ans.body), "access log bytes %r, %d compressed bytes were sent" % (
        line.get("bytes"), len(ans.body))


# ---------------------------------------------------------------------------
# A SQL route's JSON answer

def test_sql_route_json_compressed(postgres, stack):  # noqa: F811 - the fixture
    routes = [
        sql_route("big", "/sql/big", "select json_agg(g) from generate_series(1, 5000) g", result="object"),
        sql_route("small", "/sql/small", "select json_agg(g) from generate_series(1, 3) g", result="object"),
    ]
    gw = stack.gateway(gateway_config({}, routes=routes, postgres=postgres_section(postgres),
                                      compression=COMPRESSION, server=SERVER))
    ident = fetch(gw, "/sql/big")
    assert ident.status == 200, ident
    assert ident.codings == []
    assert "accept-encoding" in ident.vary, "the SQL answer qualifies, so Vary: %r" % ident
    assert len(ident.body) > 20000 and ident.body.lstrip().startswith(b"["), ident
    for coding in ("gzip", "br"):
        ans = fetch(gw, "/sql/big", coding)
        assert ans.status == 200, ans
        assert_compressed(ans, coding, ident.body)
    head = fetch(gw, "/sql/big", "gzip", method="HEAD")
    assert head.status == 200 and head.codings == [] and head.body == b"", head
    small = fetch(gw, "/sql/small", "gzip, br")
    assert small.status == 200 and small.codings == [], small
    assert "accept-encoding" not in small.vary, small
