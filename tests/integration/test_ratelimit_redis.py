"""Rate limiting with store: redis, against a real redis-server.

One Redis for the file (redis_server.py). Each test has gateways of its own
(2 workers, redis.timeout 200ms) and policies with names of their own, so their
Redis keys never meet. Checked: what the clients got, what the upstream saw, the
rl:* keys in Redis, gateway_ratelimit_store_fallbacks_total, and what happens
when Redis forgets its scripts, dies, comes back, or stalls.

The exact-count tests use windows of minutes, not 10 s: GCRA admits one more
request per window/limit after the burst, so with 50 per 10 s (a 200 ms period)
a burst that takes longer than 200 ms through Redis would rightly admit a 51st.
"""

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from harness import burst_at_once, fresh, gateway_config, route, session, upstream_config, wait_until
from redis_server import redis_server  # noqa: F401 - the fixture

# The test upstream runs in the test's own Python process, beside its client
# threads: on a loaded 2-core box (ctest -j2) it has been seen to take over the
# suite's 1 s upstream timeout, a 504 that says nothing about rate limiting.
UPSTREAM_TIMEOUT = "10s"

FALLBACKS = "gateway_ratelimit_store_fallbacks_total"
RL_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


def rl_headers(r):
    return {h: r.headers.get(h) for h in RL_HEADERS}


def assert_429(r, limit=None):
    """A refusal as test_ratelimit.py expects it: JSON 429, Retry-After >= 1,
    Remaining 0, Reset >= 1. Returns Retry-After."""
    assert r.status_code == 429, "expected 429, got %d: %r" % (r.status_code, r.text[:300])
    assert r.headers.get("Content-Type", "").startswith("application/json"), dict(r.headers)
    doc = r.json()
    assert doc.get("status") == 429 and isinstance(doc.get("error"), str) and doc["error"], doc
    retry = r.headers.get("Retry-After")
    assert retry is not None and retry.isdigit() and int(retry) >= 1, dict(r.headers)
    assert r.headers.get("RateLimit-Remaining") == "0", dict(r.headers)
    if limit is not None:
        assert r.headers.get("RateLimit-Limit") == str(limit), dict(r.headers)
    reset = r.headers.get("RateLimit-Reset")
    assert reset is not None and reset.isdigit() and int(reset) >= 1, dict(r.headers)
    return int(retry)


def limited_route(name, prefix, policies):
    r = route(name, "up", prefix=prefix)
    r["ratelimit"] = list(policies)
    return r


def redis_gateway(stack, redis, policies, routes, on_store_error="local", timeout="200ms", up=None, name=None,
                  workers=2):
    up = up or stack.upstream("up")
    cfg = gateway_config({"up": upstream_config([up], keepalive=16, timeout=UPSTREAM_TIMEOUT)}, routes=routes, server={"workers": workers},
                         ratelimit={"store": "redis", "on_store_error": on_store_error, "policies": policies},
                         redis=redis.redis_section(timeout=timeout))
    return stack.gateway(cfg, name=name), up


def fallbacks(gw):
    return gw.metrics().value(FALLBACKS)


def decisions(gw, policy):
    m = gw.metrics()
    return (m.value("gateway_ratelimit_requests_total", policy=policy, decision="allowed"),
            m.value("gateway_ratelimit_requests_total", policy=policy, decision="limited"))


def race(urls, total, threads, headers=None, timeout=10):
    """`total` requests over `threads` threads (a keep-alive connection each),
    thread i sending to urls[i % len(urls)]: list of status codes."""
    lock = threading.Lock()
    state = {"left": total}

    def worker(i):
        got = []
        with session() as s:
            while True:
                with lock:
                    if state["left"] == 0:
                        break
                    state["left"] -= 1
                got.append(s.get(urls[i % len(urls)], headers=headers or {}, timeout=timeout).status_code)
        return got

    out = []
    with ThreadPoolExecutor(threads) as pool:
        for got in pool.map(worker, range(threads)):
            out += got
    assert len(out) == total
    return out


def wait_redis_decides(gw, path, probes=8, timeout=4.0):
    """Wait until `probes` requests on fresh connections (so across the workers)
    are all decided without a fallback; returns the seconds it took."""
    start = time.monotonic()

    def clean():
        before = fallbacks(gw)
        for _ in range(probes):
            r = fresh("GET", gw.url(path), headers={"X-API-Key": "probe-" + uuid.uuid4().hex}, timeout=5)
            assert r.status_code in (200, 429), r.status_code
        return fallbacks(gw) == before
    wait_until(clean, timeout, "decisions from Redis again (no fallback over %d probes)" % probes, interval=0.05)
    return time.monotonic() - start


# --- exact counts ----------------------------------------------------------------

def test_exact_count_concurrent_one_gateway(stack, redis_server):
    """50 per 5 min, 20 threads race 200 requests through 2 workers, each
    decision an EVALSHA: exactly 50 pass, the upstream sees 50, rl:* exists."""
    gw, up = redis_gateway(stack, redis_server, {"rx_conc": {"limit": 50, "window": "5m", "key": "route"}},
                           [limited_route("conc", "/conc/", ["rx_conc"])])
    statuses = race([gw.url("/conc/echo")], 200, 20)
    ok = [s for s in statuses if s != 429]
    assert len(ok) == 50, "non-429 answers: %d (statuses %s)" % (len(ok), sorted(set(statuses)))
    assert all(s == 200 for s in ok), sorted(set(statuses))
    assert up.count(prefix="/conc/") == 50
    assert decisions(gw, "rx_conc") == (50, 150)
    assert fallbacks(gw) == 0
    keys = redis_server.keys("rl:*")
    assert keys, "no rl:* key in Redis"
    for k in keys:
        assert len(k) == 3 + 40 and all(c in "0123456789abcdef" for c in k[3:]), k
    r = fresh("GET", gw.url("/conc/echo"))
    assert_429(r, limit=50)


def test_exact_across_two_gateways(stack, redis_server):
    """Two gateway processes share the Redis: 40 per 5 min (key route) is 40 in total."""
    pol = {"rx_two": {"limit": 40, "window": "5m", "key": "route"}}
    routes = [limited_route("two", "/two/", ["rx_two"])]
    gw1, up = redis_gateway(stack, redis_server, pol, routes, name="gw-a")
    gw2, _ = redis_gateway(stack, redis_server, pol, routes, up=up, name="gw-b")
    assert gw1.port != gw2.port and gw1.pid != gw2.pid
    statuses = race([gw1.url("/two/echo"), gw2.url("/two/echo")], 160, 16)
    assert statuses.count(200) == 40, "allowed %d (statuses %s)" % (statuses.count(200), sorted(set(statuses)))
    assert statuses.count(429) == 120
    assert up.count(prefix="/two/") == 40
    a1, l1 = decisions(gw1, "rx_two")
    a2, l2 = decisions(gw2, "rx_two")
    assert a1 + a2 == 40 and l1 + l2 == 120, ((a1, l1), (a2, l2))
    assert a1 > 0 and a2 > 0, "one gateway allowed nothing: %s" % (((a1, l1), (a2, l2)),)
    assert fallbacks(gw1) == 0 and fallbacks(gw2) == 0


# --- the window edge ----------------------------------------------------------------

def test_no_burst_across_window_edge(stack, redis_server):
    """10 per 1 s through Redis: a burst of 10, then one client as fast as it can
    for 2.5 s: one per 100 ms after the burst, no second burst at the 1 s edge."""
    gw, up = redis_gateway(stack, redis_server, {"rx_edge": {"limit": 10, "window": "1s", "key": "client_ip"}},
                           [limited_route("edge", "/edge/", ["rx_edge"]), route("free", "up", prefix="/free/")])
    limit = 10
    url = gw.url("/edge/echo")
    sessions = [session() for _ in range(limit)]
    for s in sessions:
        assert s.get(gw.url("/free/warm"), timeout=10).status_code == 200
    burst, start, burst_end = burst_at_once(url, sessions)
    for s in sessions:
        s.close()
    assert burst == [200] * limit, burst
    assert burst_end - start < 0.1, "the burst took %.3fs" % (burst_end - start)

    allowed_at, refused = [], 0
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
    for i, t in enumerate(allowed_at):
        inside = [u for u in allowed_at[i:] if u < t + 1.0]
        assert len(inside) <= limit + 1, "%d allowed in [%.3f, %.3f)" % (len(inside), t, t + 1.0)
    near_edge = [t for t in allowed_at if 0.8 <= t < 1.2]
    assert len(near_edge) <= 5, near_edge
    assert limit + len([t for t in allowed_at if t < 1.0]) <= 2 * limit
    assert up.count(prefix="/edge/") == total
    assert fallbacks(gw) == 0


# --- headers ------------------------------------------------------------------------

def test_headers_on_allowed_and_limited(stack, redis_server):
    gw, up = redis_gateway(stack, redis_server, {"rx_hdr": {"limit": 5, "window": "10s", "key": "client_ip"}},
                           [limited_route("hdr", "/hdr/", ["rx_hdr"])])
    s = session()
    seen = []
    for i in range(5):
        r = s.get(gw.url("/hdr/echo"), timeout=10)
        assert r.status_code == 200, r.text[:300]
        h = rl_headers(r)
        seen.append(h)
        assert h["RateLimit-Limit"] == "5", h
        assert h["RateLimit-Remaining"] == str(4 - i), seen
        assert 2 * (i + 1) - 1 <= int(h["RateLimit-Reset"]) <= 2 * (i + 1), seen
        assert "Retry-After" not in r.headers
    r = s.get(gw.url("/hdr/echo"), timeout=10)
    retry = assert_429(r, limit=5)
    assert 1 <= retry <= 2, dict(r.headers)
    assert 9 <= int(r.headers["RateLimit-Reset"]) <= 10, dict(r.headers)
    assert_429(s.get(gw.url("/hdr/echo"), timeout=10), limit=5)
    s.close()
    assert up.count(prefix="/hdr/") == 5
    assert decisions(gw, "rx_hdr") == (5, 2)
    assert fallbacks(gw) == 0


# --- NOSCRIPT -----------------------------------------------------------------------

def test_script_flush_reloads_with_eval(stack, redis_server):
    """After SCRIPT FLUSH, EVALSHA answers NOSCRIPT: the gateway runs EVAL and
    the decisions stay exact (no fallback)."""
    gw, up = redis_gateway(stack, redis_server, {"rx_ns": {"limit": 6, "window": "5m", "key": "header:X-API-Key"}},
                           [limited_route("ns", "/ns/", ["rx_ns"])])

    def run(key, n):
        return [fresh("GET", gw.url("/ns/echo"), headers={"X-API-Key": key}).status_code for _ in range(n)]

    assert run("before", 8) == [200] * 6 + [429] * 2
    evals_before = redis_server.command_calls("eval")
    redis_server.cli("script", "flush")
    assert redis_server.cli("script", "exists", "0" * 40).strip() == "0"
    assert run("after", 9) == [200] * 6 + [429] * 3
    statuses = race([gw.url("/ns/echo")], 40, 8, headers={"X-API-Key": "after-conc"})
    assert statuses.count(200) == 6 and statuses.count(429) == 34, sorted(statuses)
    assert redis_server.command_calls("eval") > evals_before, "no EVAL after SCRIPT FLUSH"
    assert fallbacks(gw) == 0
    assert up.count(prefix="/ns/") == 18


# --- Redis killed during load ---------------------------------------------------------

class Load:
    """Threads sending requests as fast as they get answers; records (status, seconds)."""

    def __init__(self, url, threads=4, headers=None):
        self.url, self.headers = url, headers or {}
        self.stop = threading.Event()
        self.results = []
        self.errors = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        with session() as s:
            while not self.stop.is_set():
                t = time.monotonic()
                try:
                    code = s.get(self.url, headers=self.headers, timeout=5).status_code
                except requests.RequestException as e:
                    with self.lock:
                        self.errors.append(repr(e))
                    continue
                with self.lock:
                    self.results.append((code, time.monotonic() - t))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
def test_redis_killed_during_load(stack, redis_server, mode):
    pol = "rx_kill_" + mode
    gw, up = redis_gateway(stack, redis_server, {pol: {"limit": 5, "window": "5m", "key": "header:X-API-Key"}},
                           [limited_route("k", "/k/", [pol])], on_store_error=mode)

    def run(key, n):
        return [fresh("GET", gw.url("/k/echo"), headers={"X-API-Key": key}, timeout=5).status_code
                for _ in range(n)]

    # Up: Redis decides.
    assert run("up-" + mode, 7) == [200] * 5 + [429] * 2
    assert fallbacks(gw) == 0

    with Load(gw.url("/k/echo"), headers={"X-API-Key": "load-" + mode}) as load:
        time.sleep(0.3)
        redis_server.kill()
        killed_at = time.monotonic()
        time.sleep(0.7)
        down = run("down-" + mode, 8)
        fb_down = fallbacks(gw)
        time.sleep(0.2)
    assert not load.errors, load.errors[:5]
    assert load.results, "no request answered during the load"
    slow = [d for _, d in load.results if d > 2.0]
    assert not slow, "answers slower than 2 s: %s" % slow[:10]
    codes = {c for c, _ in load.results}
    assert codes <= {200, 429}, "unexpected statuses under load: %s" % sorted(codes)

    expected = {"allow": [200] * 8, "deny": [429] * 8, "local": [200] * 5 + [429] * 3}[mode]
    assert down == expected, "on_store_error %s with Redis down: %s" % (mode, down)
    assert fb_down >= 8, "fallbacks while down: %s" % fb_down

    # The contract: within 2 s of Redis's return, Redis decides again. Redis
    # stays down long enough for every connection's reconnect backoff to reach
    # its 1 s cap (50 ms doubling: 1.55 s of attempts), the worst case; the
    # time runs from the restarted server's first PONG to the end of the first
    # probe round in which no request fell back.
    while time.monotonic() - killed_at < 3.0:
        time.sleep(0.05)
    redis_server.start()  # same port, empty; returns once it answers PING
    took = wait_redis_decides(gw, "/k/echo", timeout=4.0)
    assert took < 2.0, "took %.2fs after Redis answered PING to use it again" % took
    fb = fallbacks(gw)
    assert run("back-" + mode, 7) == [200] * 5 + [429] * 2
    assert fallbacks(gw) == fb, "fallbacks still increasing after Redis came back"
    assert redis_server.keys("rl:*"), "decisions after the restart left no rl:* key"


# --- Redis slow ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["allow", "deny"])
def test_redis_slow_answers_within_timeout(stack, redis_server, mode):
    """CLIENT PAUSE 1000 ms, redis.timeout 200ms: each request is answered by
    on_store_error within the timeout plus a margin, then Redis decides again."""
    pol = "rx_slow_" + mode
    gw, up = redis_gateway(stack, redis_server, {pol: {"limit": 1000, "window": "5m", "key": "header:X-API-Key"}},
                           [limited_route("s", "/s/", [pol])], on_store_error=mode, timeout="200ms")
    r = fresh("GET", gw.url("/s/echo"), headers={"X-API-Key": "warm"})
    assert r.status_code == 200
    with ThreadPoolExecutor(4) as pool:  # open both workers' connections first
        list(pool.map(lambda i: fresh("GET", gw.url("/s/echo"), headers={"X-API-Key": "w%d" % i}).status_code,
                      range(8)))
    assert fallbacks(gw) == 0
    want = 200 if mode == "allow" else 429

    redis_server.pause(1.0)
    paused_at = time.monotonic()
    got, answers = [], []

    def one(i):
        t = time.monotonic()
        r = fresh("GET", gw.url("/s/echo"), headers={"X-API-Key": "slow-%d" % i}, timeout=5)
        answers.append(r)
        return r.status_code, time.monotonic() - t
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, range(8)))
    assert time.monotonic() - paused_at < 0.95, "the paused phase outlasted the pause: results not conclusive"
    margin = 0.2 + 0.35
    late = [(c, round(d, 3)) for c, d in got if d > margin]
    assert not late, "answers later than redis.timeout + margin (%.2fs): %s" % (margin, late)
    assert [c for c, _ in got] == [want] * 8, got
    # Past redis.timeout no store decided: allow lets the request go without
    # RateLimit-* (no numbers to tell), deny's 429 has them and Retry-After;
    # neither is counted allowed (deny: limited, its 429 was sent).
    for r in answers:
        if mode == "allow":
            assert not any(h in r.headers for h in RL_HEADERS + ("Retry-After",)), dict(r.headers)
        else:
            assert_429(r, limit=1000)
    allowed, limited = decisions(gw, pol)
    assert allowed == 9 and limited == (0 if mode == "allow" else 8), (allowed, limited)
    assert fallbacks(gw) >= 8

    wait_until(lambda: time.monotonic() - paused_at > 1.05, 2, "pause over")
    wait_redis_decides(gw, "/s/echo", timeout=4.0)


# --- password ----------------------------------------------------------------------

def test_password(stack, tmp_path):
    """A Redis with requirepass: the gateway's redis.password authenticates; a
    wrong one leaves every decision to on_store_error."""
    from redis_server import RedisServer
    red = RedisServer(name="redis-auth", scratch=tmp_path / "redis", password="s3cret-pw")
    try:
        red.start()
        pol = {"rx_pw": {"limit": 3, "window": "5m", "key": "client_ip"}}
        routes = [limited_route("pw", "/pw/", ["rx_pw"])]
        gw, up = redis_gateway(stack, red, pol, routes, on_store_error="allow")
        got = [fresh("GET", gw.url("/pw/echo")).status_code for _ in range(5)]
        assert got == [200, 200, 200, 429, 429], got
        assert fallbacks(gw) == 0
        assert red.keys("rl:*")

        bad = dict(red.redis_section(), password="bad-pw-xyz")
        cfg = gateway_config({"up": upstream_config([up])}, routes=routes, server={"workers": 2},
                             ratelimit={"store": "redis", "on_store_error": "deny", "policies": pol}, redis=bad)
        gw2 = stack.gateway(cfg, name="gw-badpw")
        got = [fresh("GET", gw2.url("/pw/echo"), timeout=5).status_code for _ in range(3)]
        assert got == [429] * 3, got
        assert fallbacks(gw2) == 3
        for secret in ("s3cret-pw", "bad-pw-xyz"):
            assert secret not in gw.stderr() + gw2.stderr(), "password in the diagnostic log"
    finally:
        red.close()
