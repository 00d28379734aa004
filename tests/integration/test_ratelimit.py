"""Rate limiting (ratelimit: policies on routes; GCRA in the per-process local store).

One gateway (2 workers) for most of the file, in front of one test upstream, with
a route and a policy of its own per test so the budgets do not meet. Gateways of
their own for trusted_proxies and for store: redis with no Redis running (so
on_store_error decides; test_ratelimit_redis.py has a real Redis). Each test checks what the client got, what the
upstream saw and gateway_ratelimit_* in /metrics."""

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import (burst_at_once, fresh, gateway_config, raw_connect, read_response, route, session,
                     upstream_config)

# The test upstream runs in the test's own Python process, beside its client
# threads: on a loaded 2-core box (ctest -j2) it has been seen to take over the
# suite's 1 s upstream timeout, a 504 that says nothing about rate limiting.
UPSTREAM_TIMEOUT = "10s"

RL_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


def limited_route(name, prefix, policies):
    r = route(name, "up", prefix=prefix)
    r["ratelimit"] = list(policies)
    return r


POLICIES = {
    # Period 6 s: nothing refills while the concurrent burst runs.
    "conc": {"limit": 50, "window": "5m", "key": "client_ip"},
    "hdr_small": {"limit": 5, "window": "10s", "key": "client_ip"},
    "hdr_big": {"limit": 1000, "window": "10s", "key": "route"},
    "edge": {"limit": 10, "window": "1s", "key": "client_ip"},
    "spoof": {"limit": 5, "window": "1m", "key": "client_ip"},
    "apikey": {"limit": 3, "window": "1m", "key": "header:X-API-Key"},
    "dry": {"limit": 2, "window": "1m", "key": "client_ip", "dry_run": True},
    "mix_dry": {"limit": 1, "window": "1m", "key": "client_ip", "dry_run": True},
    "mix_real": {"limit": 4, "window": "1m", "key": "client_ip"},
    "dry_a": {"limit": 5, "window": "1m", "key": "client_ip", "dry_run": True},
    "dry_b": {"limit": 2, "window": "1m", "key": "client_ip", "dry_run": True},
    "upq": {"limit": 100, "window": "1m", "key": "client_ip"},
}

ROUTES = [
    limited_route("conc", "/conc/", ["conc"]),
    limited_route("hdr", "/hdr/", ["hdr_big", "hdr_small"]),
    limited_route("edge", "/edge/", ["edge"]),
    limited_route("spoof", "/spoof/", ["spoof"]),
    limited_route("apikey", "/apikey/", ["apikey"]),
    limited_route("dry", "/dry/", ["dry"]),
    limited_route("mix", "/mix/", ["mix_dry", "mix_real"]),
    limited_route("dry2", "/dry2/", ["dry_a", "dry_b"]),
    limited_route("upq", "/upq/", ["upq"]),
    route("free", "up", prefix="/free/"),
]


class Env:
    pass


@pytest.fixture(scope="module")
def env(module_stack):
    e = Env()
    e.up = module_stack.upstream("up")
    cfg = gateway_config({"up": upstream_config([e.up], keepalive=32, timeout=UPSTREAM_TIMEOUT)}, routes=ROUTES,
                         server={"workers": 2},
                         ratelimit={"store": "local", "policies": POLICIES})
    e.gw = module_stack.gateway(cfg)
    yield e


def one_gateway(stack, ratelimit, policies, routes):
    """A gateway of its own (2 workers) with these ratelimit settings."""
    up = stack.upstream("up")
    rl = dict(ratelimit)
    rl["policies"] = policies
    sections = {"ratelimit": rl}
    if rl.get("store") == "redis":
        # A redis: section is required for store: redis; nothing listens there.
        sections["redis"] = {"url": "redis://127.0.0.1:%d/0" % stack.dead_port().port}
    cfg = gateway_config({"up": upstream_config([up], keepalive=8, timeout=UPSTREAM_TIMEOUT)}, routes=routes, **sections)
    return stack.gateway(cfg), up


def rl_headers(r):
    return {h: r.headers.get(h) for h in RL_HEADERS}


def assert_no_rl_headers(r):
    for h in RL_HEADERS + ("Retry-After",):
        assert h not in r.headers, "%s on %s: %r" % (h, r.url, dict(r.headers))


def assert_429(r, limit=None):
    assert r.status_code == 429, "expected 429, got %d: %r" % (r.status_code, r.text[:300])
    assert r.headers.get("Content-Type", "").startswith("application/json"), dict(r.headers)
    doc = r.json()
    assert doc.get("status") == 429, doc
    assert isinstance(doc.get("error"), str) and doc["error"], doc
    retry = r.headers.get("Retry-After")
    assert retry is not None and retry.isdigit() and int(retry) >= 1, dict(r.headers)
    assert r.headers.get("RateLimit-Remaining") == "0", dict(r.headers)
    if limit is not None:
        assert r.headers.get("RateLimit-Limit") == str(limit), dict(r.headers)
    reset = r.headers.get("RateLimit-Reset")
    assert reset is not None and reset.isdigit() and int(reset) >= 1, dict(r.headers)
    return int(retry)


def counts(gw, policy):
    m = gw.metrics()
    return (m.value("gateway_ratelimit_requests_total", policy=policy, decision="allowed"),
            m.value("gateway_ratelimit_requests_total", policy=policy, decision="limited"))


# --- exact counts under concurrency --------------------------------------------

def test_exact_count_under_concurrency(env):
    """50 per 5 min, 20 threads with a connection each race 200 requests through
    2 workers: exactly 50 pass, the upstream sees exactly 50, the rest are 429."""
    total, threads = 200, 20
    lock = threading.Lock()
    state = {"left": total}
    statuses = []

    def worker(i):
        got = []
        with session() as s:
            while True:
                with lock:
                    if state["left"] == 0:
                        break
                    state["left"] -= 1
                r = s.get(env.gw.url("/conc/echo/%d" % i), timeout=10)
                got.append(r.status_code)
                if r.status_code == 429:
                    assert_429(r, limit=50)
        return got

    with ThreadPoolExecutor(threads) as pool:
        for got in pool.map(worker, range(threads)):
            statuses += got
    assert len(statuses) == total
    ok = [s for s in statuses if s != 429]
    assert len(ok) == 50, "non-429 answers: %d (statuses %s)" % (len(ok), sorted(set(statuses)))
    assert all(s == 200 for s in ok), sorted(set(statuses))
    assert statuses.count(429) == 150
    assert env.up.count(prefix="/conc/") == 50
    assert counts(env.gw, "conc") == (50, 150)


# --- headers ----------------------------------------------------------------------

def test_headers_on_allowed_and_limited(env):
    """hdr_small (5 per 10 s, per client) has less room than hdr_big (1000 per
    10 s, per route): its numbers are shown. Remaining counts down, Reset grows
    by the 2 s period; the 6th is a 429 with Retry-After and Remaining 0."""
    s = session()
    seen = []
    for i in range(5):
        r = s.get(env.gw.url("/hdr/echo"), timeout=10)
        assert r.status_code == 200, r.text[:300]
        h = rl_headers(r)
        seen.append(h)
        assert h["RateLimit-Limit"] == "5", h
        assert h["RateLimit-Remaining"] == str(4 - i), seen
        reset = int(h["RateLimit-Reset"])
        assert 2 * (i + 1) - 1 <= reset <= 2 * (i + 1), seen
        assert "Retry-After" not in r.headers
    r = s.get(env.gw.url("/hdr/echo"), timeout=10)
    retry = assert_429(r, limit=5)
    assert 1 <= retry <= 2, dict(r.headers)
    assert 9 <= int(r.headers["RateLimit-Reset"]) <= 10, dict(r.headers)
    # Refused requests stay refused, and the connection stays usable.
    r = s.get(env.gw.url("/hdr/echo"), timeout=10)
    assert_429(r, limit=5)
    s.close()
    assert env.up.count(prefix="/hdr/") == 5
    allowed, limited = counts(env.gw, "hdr_small")
    assert (allowed, limited) == (5, 2)


def test_unlimited_route_has_no_headers(env):
    for _ in range(5):
        r = fresh("GET", env.gw.url("/free/echo"))
        assert r.status_code == 200
        assert_no_rl_headers(r)
    assert env.up.count(prefix="/free/") == 5


def test_upstream_ratelimit_fields_replaced_on_limited_route(env):
    """An upstream that sends RateLimit-* of its own: on a limited route the
    answer carries ours, each field exactly once (raw head lines), and the
    upstream's other fields; on an unlimited route the upstream's pass."""
    query = "/headers?RateLimit-Limit=999&RateLimit-Remaining=998&RateLimit-Reset=7&X-Other=kept"
    for path, ours in (("/upq" + query, True), ("/free" + query, False)):
        sock = raw_connect(env.gw.port)
        try:
            sock.sendall(("GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % path).encode())
            status, msg, _ = read_response(sock)
        finally:
            sock.close()
        assert status == 200, (path, status)
        for name in RL_HEADERS:
            assert len(msg.get_all(name) or []) == 1, (path, name, msg.items())
        want = ("100", "99") if ours else ("999", "998")
        assert (msg["RateLimit-Limit"], msg["RateLimit-Remaining"]) == want, (path, msg.items())
        assert msg["RateLimit-Reset"] == ("1" if ours else "7"), (path, msg.items())
        assert msg["X-Other"] == "kept", (path, msg.items())


def test_upstream_ratelimit_fields_replaced_on_cached_route(stack):
    """The same on a limited route with a cache: the upstream's RateLimit-*
    are stored with the entry, and the miss, a hit and a HEAD hit each carry
    ours only, each field exactly once, Remaining counting down."""
    up = stack.upstream("up")
    r = limited_route("limc", "/limc/", ["limc"])
    r["cache"] = {"ttl": "60s"}
    cfg = gateway_config({"up": upstream_config([up], keepalive=8, timeout=UPSTREAM_TIMEOUT)}, routes=[r],
                         cache={"store": "memory"},
                         ratelimit={"store": "local",
                                    "policies": {"limc": {"limit": 100, "window": "1m", "key": "client_ip"}}})
    gw = stack.gateway(cfg)
    path = "/limc/headers?RateLimit-Limit=999&RateLimit-Remaining=998&RateLimit-Reset=7&X-Other=kept"
    for i, (method, cache) in enumerate((("GET", "MISS"), ("GET", "HIT"), ("HEAD", "HIT"))):
        sock = raw_connect(gw.port)
        try:
            sock.sendall(("%s %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % (method, path)).encode())
            status, msg, _ = read_response(sock, method=method)
        finally:
            sock.close()
        assert status == 200 and msg["X-Cache"] == cache, (method, status, msg.items())
        for name in RL_HEADERS:
            assert len(msg.get_all(name) or []) == 1, (method, cache, name, msg.items())
        assert (msg["RateLimit-Limit"], msg["RateLimit-Remaining"]) == ("100", str(99 - i)), (method, msg.items())
        assert msg["X-Other"] == "kept", msg.items()
    assert up.count(prefix="/limc/") == 1


# --- the window edge --------------------------------------------------------------

def test_no_burst_across_window_edge(env):
    """10 per 1 s: 10 at once, then one client as fast as it can for 2.5 s. After
    the initial burst the rate is one per 100 ms: no 1 s interval holds more
    than limit + 1 (a fixed window would let another 10 through at the 1 s
    edge), and the total is 10 + 2.5 * 10, +-2.

    GCRA lets the burst and one per period after it, so a 1 s interval that
    includes the initial burst may hold up to 2 * limit: bounded separately."""
    limit = 10
    url = env.gw.url("/edge/echo")
    sessions = [session() for _ in range(limit)]
    for s in sessions:  # connect first, so that the burst is one instant
        assert s.get(env.gw.url("/free/warm"), timeout=10).status_code == 200
    burst, start, burst_end = burst_at_once(url, sessions)
    for s in sessions:
        s.close()
    assert burst == [200] * limit, burst
    assert burst_end - start < 0.1, "the burst took %.3fs" % (burst_end - start)

    allowed_at = []  # send times of allowed requests after the burst
    refused = 0
    s = session()
    while time.monotonic() - start < 2.5:
        t = time.monotonic()
        r = s.get(url, timeout=10)
        if r.status_code == 200:
            allowed_at.append(t - start)
        else:
            assert r.status_code == 429, r.status_code
            refused += 1
    elapsed = time.monotonic() - start
    s.close()

    assert refused > 50, "not a high rate: %d refused" % refused
    total = limit + len(allowed_at)
    expected = limit + elapsed * limit
    assert abs(total - expected) <= 2, "allowed %d in %.2fs, expected %.1f +- 2 (after burst: %s)" % (
        total, elapsed, expected, ["%.3f" % t for t in allowed_at])
    # After the burst: at most limit + 1 in any 1 s interval.
    for i, t in enumerate(allowed_at):
        inside = [u for u in allowed_at[i:] if u < t + 1.0]
        assert len(inside) <= limit + 1, "%d allowed in [%.3f, %.3f)" % (len(inside), t, t + 1.0)
    # Around the window edge (1 s after the burst): one per period, no second burst.
    near_edge = [t for t in allowed_at if 0.8 <= t < 1.2]
    assert len(near_edge) <= 5, near_edge
    # Including the burst: limit + one per period.
    first_second = [t for t in allowed_at if t < 1.0]
    assert limit + len(first_second) <= 2 * limit, first_second
    assert env.up.count(prefix="/edge/") == total


# --- client identity --------------------------------------------------------------

def test_spoofed_forwarded_for_ignored_without_trusted_proxies(env):
    """No trusted_proxies: a different random X-Forwarded-For on every request
    still shares the peer's one budget of 5."""
    statuses = []
    for _ in range(12):
        xff = "%d.%d.%d.%d" % tuple(random.randint(1, 254) for _ in range(4))
        r = fresh("GET", env.gw.url("/spoof/echo"), headers={"X-Forwarded-For": xff})
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert_429(r, limit=5)
    assert statuses == [200] * 5 + [429] * 7, statuses
    assert env.up.count(prefix="/spoof/") == 5


def test_trusted_proxy_forwarded_for_separates_clients(stack):
    """trusted_proxies 127.0.0.1/32: the rightmost untrusted X-Forwarded-For
    entry is the client; each gets its own budget of 3."""
    gw, up = one_gateway(stack, {"store": "local", "trusted_proxies": ["127.0.0.1/32"]},
                         {"tp": {"limit": 3, "window": "1m", "key": "client_ip"}},
                         [limited_route("tp", "/tp/", ["tp"])])

    def run(xff, n):
        headers = {"X-Forwarded-For": xff} if xff is not None else {}
        return [fresh("GET", gw.url("/tp/echo"), headers=headers).status_code for _ in range(n)]

    assert run("203.0.113.1", 5) == [200, 200, 200, 429, 429]
    assert run("203.0.113.2", 4) == [200, 200, 200, 429]
    # The peer itself (no X-Forwarded-For) is a client of its own.
    assert run(None, 4) == [200, 200, 200, 429]
    # Entries left of the rightmost untrusted one could be forged: ignored.
    assert run("198.51.100.%d, 203.0.113.9" % random.randint(1, 254), 1) == [200]
    assert run("192.0.2.77, 203.0.113.9", 1) == [200]
    assert run("203.0.113.9", 2) == [200, 429]
    # Trusted hops on the right are skipped: the client is 203.0.113.5.
    assert run("203.0.113.5, 127.0.0.1", 2) == [200, 200]
    assert run("203.0.113.5", 2) == [200, 429]
    assert up.count(prefix="/tp/") == 3 + 3 + 3 + 3 + 3
    m = gw.metrics()
    assert m.value("gateway_ratelimit_requests_total", policy="tp", decision="allowed") == 15
    assert m.value("gateway_ratelimit_requests_total", policy="tp", decision="limited") == 6


def test_trusted_proxy_forwarded_for_over_several_lines(stack):
    """X-Forwarded-For in two field lines is one list (RFC 9110 5.3), the
    trusted proxy's entry last: the client is the rightmost untrusted entry of
    the last line, whatever a client forged in the first."""
    gw, up = one_gateway(stack, {"store": "local", "trusted_proxies": ["127.0.0.1/32"]},
                         {"tp2": {"limit": 2, "window": "1m", "key": "client_ip"}},
                         [limited_route("tp2", "/tp2/", ["tp2"])])

    def send(lines):
        sock = raw_connect(gw.port)
        try:
            head = "GET /tp2/echo HTTP/1.1\r\nHost: x\r\n%sConnection: close\r\n\r\n" % "".join(
                "X-Forwarded-For: %s\r\n" % v for v in lines)
            sock.sendall(head.encode())
            return read_response(sock)[0]
        finally:
            sock.close()

    got = [send(["10.9.%d.%d" % (i, i), "203.0.113.50"]) for i in range(1, 5)]
    assert got == [200, 200, 429, 429], "forged first X-Forwarded-For line chose the client: %s" % got


def test_api_key_budgets(env):
    """key: header:X-API-Key: one budget of 3 per key (and one for no key)."""
    def run(key, n):
        headers = {"X-API-Key": key} if key is not None else {}
        return [fresh("GET", env.gw.url("/apikey/echo"), headers=headers).status_code for _ in range(n)]

    assert run("key-a", 5) == [200, 200, 200, 429, 429]
    assert run("key-b", 4) == [200, 200, 200, 429]
    assert run("key-a", 1) == [429]
    assert run(None, 4) == [200, 200, 200, 429]
    assert run("key-c", 3) == [200, 200, 200]
    assert env.up.count(prefix="/apikey/") == 12
    assert counts(env.gw, "apikey") == (12, 5)


# --- dry run ----------------------------------------------------------------------

def assert_dry_headers(r, limit, remaining):
    """A dry-run-only route's answer: 200 with the dry-run policy's numbers, never Retry-After."""
    assert r.status_code == 200, r.text[:300]
    h = rl_headers(r)
    assert h["RateLimit-Limit"] == str(limit) and h["RateLimit-Remaining"] == str(remaining), h
    assert h["RateLimit-Reset"] is not None and h["RateLimit-Reset"].isdigit(), h
    assert "Retry-After" not in r.headers, dict(r.headers)
    return int(h["RateLimit-Reset"])


def test_dry_run_counts_but_never_refuses(env):
    """A route whose only policy is dry-run: it is limited too, so its answers
    carry RateLimit-* (PRODUCT.md: on every limited route), with Remaining 0
    once the policy would refuse, and never Retry-After or a 429."""
    resets = []
    for i in range(6):
        r = fresh("GET", env.gw.url("/dry/echo"))
        resets.append(assert_dry_headers(r, 2, max(1 - i, 0)))
    assert resets[0] >= 1 and all(30 <= t <= 60 for t in resets[1:]), resets  # 2 per minute: 30 s per request
    assert env.up.count(prefix="/dry/") == 6
    assert counts(env.gw, "dry") == (2, 4)


def test_dry_run_only_route_shows_least_room(env):
    """Two dry-run policies (5 and 2 per minute, the first listed first): the
    answers show the one with the least room, dry_b."""
    for i in range(4):
        assert_dry_headers(fresh("GET", env.gw.url("/dry2/echo")), 2, max(1 - i, 0))
    assert env.up.count(prefix="/dry2/") == 4
    assert counts(env.gw, "dry_a") == (4, 0)
    assert counts(env.gw, "dry_b") == (2, 2)


def test_dry_run_next_to_enforcing_policy(env):
    """A dry-run policy beside an enforcing one: only the enforcing one refuses
    and only its numbers are shown."""
    statuses = []
    for i in range(6):
        r = fresh("GET", env.gw.url("/mix/echo"))
        statuses.append(r.status_code)
        if r.status_code == 200:
            assert r.headers.get("RateLimit-Limit") == "4", dict(r.headers)
            assert r.headers.get("RateLimit-Remaining") == str(3 - i), dict(r.headers)
        else:
            assert_429(r, limit=4)
    assert statuses == [200] * 4 + [429] * 2
    assert counts(env.gw, "mix_real") == (4, 2)
    assert counts(env.gw, "mix_dry") == (1, 5)


# --- store: redis (not built: on_store_error decides) -----------------------------

REDIS_POLICIES = {"rp": {"limit": 100, "window": "1m", "key": "client_ip"},
                  "rp_dry": {"limit": 1, "window": "1m", "key": "client_ip", "dry_run": True}}
REDIS_ROUTES = [limited_route("rl", "/rl/", ["rp", "rp_dry"]), limited_route("rldry", "/rldry/", ["rp_dry"]),
                route("free", "up", prefix="/free/")]


def test_store_error_deny(stack):
    """on_store_error: deny, no store: a route with an enforced policy answers
    429 (counted limited for the enforced policy: its 429 was sent); the
    dry-run policy beside it and a dry-run-only route count nothing (no store
    decided them; before, deny counted them limited) and the dry-run-only
    route's answers go on without RateLimit-* (nobody decided its numbers)."""
    gw, up = one_gateway(stack, {"store": "redis", "on_store_error": "deny"}, REDIS_POLICIES, REDIS_ROUTES)
    for _ in range(5):
        r = fresh("GET", gw.url("/rl/echo"))
        assert_429(r, limit=100)
    for _ in range(3):
        r = fresh("GET", gw.url("/rldry/echo"))
        assert r.status_code == 200, r.text[:300]
        assert_no_rl_headers(r)
    r = fresh("GET", gw.url("/free/echo"))
    assert r.status_code == 200
    assert_no_rl_headers(r)
    assert up.count(prefix="/rl/") == 0 and up.count(prefix="/rldry/") == 3
    assert gw.metrics().value("gateway_ratelimit_store_fallbacks_total") == 5 * 2 + 3
    assert counts(gw, "rp") == (0, 5)
    assert counts(gw, "rp_dry") == (0, 0)


def test_store_error_allow(stack):
    """on_store_error: allow, no store: every request goes, with no RateLimit-*
    headers (no store decided, so there is no Remaining to tell: before, it
    said the full limit was left) and nothing counted allowed or limited;
    each policy's fallback is counted."""
    policies = dict(REDIS_POLICIES, rp={"limit": 2, "window": "1m", "key": "client_ip"})
    gw, up = one_gateway(stack, {"store": "redis", "on_store_error": "allow"}, policies, REDIS_ROUTES)
    for path in ("/rl/echo", "/rldry/echo"):
        for _ in range(6):
            r = fresh("GET", gw.url(path))
            assert r.status_code == 200, r.text[:300]
            assert_no_rl_headers(r)
    assert up.count(prefix="/rl/") == 6 and up.count(prefix="/rldry/") == 6
    assert gw.metrics().value("gateway_ratelimit_store_fallbacks_total") == 6 * 2 + 6
    assert counts(gw, "rp") == (0, 0)
    assert counts(gw, "rp_dry") == (0, 0)


def test_store_error_local(stack):
    """on_store_error: local: the local store enforces, every decision counts as
    a fallback, and, decided by a store, is counted and shown as usual."""
    policies = dict(REDIS_POLICIES, rp={"limit": 3, "window": "1m", "key": "client_ip"})
    gw, up = one_gateway(stack, {"store": "redis", "on_store_error": "local"}, policies, REDIS_ROUTES)
    got = [fresh("GET", gw.url("/rl/echo")) for _ in range(5)]
    assert [r.status_code for r in got] == [200, 200, 200, 429, 429]
    assert [r.headers.get("RateLimit-Remaining") for r in got] == ["2", "1", "0", "0", "0"]
    assert up.count(prefix="/rl/") == 3
    assert gw.metrics().value("gateway_ratelimit_store_fallbacks_total") == 5 * 2
    assert counts(gw, "rp") == (3, 2)
    # charged for the first that went; would have refused the other 4 (no room for the refused ones either)
    assert counts(gw, "rp_dry") == (1, 4)
