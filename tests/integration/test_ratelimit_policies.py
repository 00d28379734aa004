"""A route's rate-limit policies are all or nothing, with store: local and store: redis.

The route /two/ has two enforced policies with the same one-minute window (so
nothing refills while a test runs): `per_client` (header:X-Client, 5) and
`route_wide` (route, 12), and a dry-run one, `dry_wide` (route, 3). A request
one policy refuses costs the others nothing (nginx's limit_req does the same
with its zones): client A sends 20 and gets 5, and the route-wide budget then
still has 7, so client B gets its 5 and client C the last 2 (before, A's 15
refused requests took the route-wide budget, and B and C got nothing). The
dry-run policy refuses nothing; it is charged only for requests that went (3)
and counts would-be refusals in gateway_ratelimit_requests_total.

Checked on what the clients got (statuses, RateLimit-* of the refusing policy),
what the upstream saw, /metrics, and with Redis the keys' TATs in Redis itself
(TAT - TIME = charged periods): sequentially, across two gateway instances
sharing the Redis, and under concurrency with exact totals. One redis-server
for the file (redis_server.py); gateways of their own per test. And
`gateway --check` refusing a route with more than 8 policies.
"""

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import fresh, gateway_config, route, run_gateway, session, to_yaml, upstream_config
from redis_server import redis_server  # noqa: F401 - the fixture

# The test upstream runs in the test's own Python process, beside its client
# threads: on a loaded 2-core box (ctest -j2) it has been seen to take over the
# suite's 1 s upstream timeout, a 504 that says nothing about rate limiting.
UPSTREAM_TIMEOUT = "10s"

WINDOW_S = 60
POLICIES = {
    "per_client": {"limit": 5, "window": "1m", "key": "header:X-Client"},
    "route_wide": {"limit": 12, "window": "1m", "key": "route"},
    "dry_wide": {"limit": 3, "window": "1m", "key": "route", "dry_run": True},
}
REQUESTS = "gateway_ratelimit_requests_total"
FALLBACKS = "gateway_ratelimit_store_fallbacks_total"


def two_route(name="two"):
    r = route(name, "up", prefix="/%s/" % name)
    r["ratelimit"] = ["per_client", "route_wide", "dry_wide"]
    return r


def start_gateway(stack, store, redis=None, up=None, name=None, routes=None):
    up = up or stack.upstream("up")
    rl = {"store": store, "policies": POLICIES}
    sections = {"ratelimit": rl}
    if store == "redis":
        rl["on_store_error"] = "deny"  # a fallback would show as 429s: the counts would not add up
        sections["redis"] = redis.redis_section(timeout="2s")
    cfg = gateway_config({"up": upstream_config([up], keepalive=16, timeout=UPSTREAM_TIMEOUT)}, routes=routes or [two_route()],
                         server={"workers": 2}, **sections)
    return stack.gateway(cfg, name=name), up


def counts(gateways, policy):
    allowed = limited = 0
    for gw in gateways:
        m = gw.metrics()
        allowed += m.value(REQUESTS, policy=policy, decision="allowed")
        limited += m.value(REQUESTS, policy=policy, decision="limited")
    return allowed, limited


def send(url, client, n):
    """n requests from client, one after the other: the responses."""
    with session() as s:
        return [s.get(url, headers={"X-Client": client}, timeout=10) for _ in range(n)]


def codes(responses):
    return [r.status_code for r in responses]


def rl_key(*parts):
    """The Redis key name of a policy's key material: each part followed by a NUL."""
    return "rl:" + hashlib.sha1(b"".join(p.encode() + b"\0" for p in parts)).hexdigest()


def tat_ahead_us(redis, key):
    """TAT - Redis's TIME for key, in microseconds (None when the key is absent)."""
    tat = redis.cli("get", key).strip()
    if not tat:
        return None
    sec, usec = redis.cli("time").split()
    return int(tat) - (int(sec) * 1000000 + int(usec))


def assert_charged(redis, key, periods, period_us, slack_us=15000000):
    """key's TAT is `periods` periods ahead of now, less at most slack (time passed since)."""
    ahead = tat_ahead_us(redis, key)
    want = periods * period_us
    assert ahead is not None, "no %s in Redis" % key
    assert want - slack_us < ahead <= want, "%s: TAT %d us ahead, expected %d (%d periods)" % (
        key, ahead, want, periods)


def check_sequence(gateways, up, urls):
    """A 20, B 20, C 20, D 5 (client i on urls[i % len(urls)]): 5, 5, 2, 0."""
    got = {}
    for i, (client, n) in enumerate((("A", 20), ("B", 20), ("C", 20), ("D", 5))):
        got[client] = send(urls[i % len(urls)], client, n)
    assert codes(got["A"]) == [200] * 5 + [429] * 15, codes(got["A"])
    assert codes(got["B"]) == [200] * 5 + [429] * 15, codes(got["B"])
    assert codes(got["C"]) == [200] * 2 + [429] * 18, codes(got["C"])
    assert codes(got["D"]) == [429] * 5, codes(got["D"])
    assert up.count(prefix="/two/") == 12

    # Answers: the allowed ones show the policy with the least room; a 429
    # shows the policy that refused (A's: its own 5; C's: the route's 12).
    a = got["A"]
    assert [r.headers["RateLimit-Limit"] for r in a[:5]] == ["5"] * 5
    assert [r.headers["RateLimit-Remaining"] for r in a[:5]] == ["4", "3", "2", "1", "0"]
    for r in a[5:]:
        assert r.headers["RateLimit-Limit"] == "5" and r.headers["RateLimit-Remaining"] == "0", dict(r.headers)
        assert int(r.headers["Retry-After"]) >= 1
    c = got["C"]
    assert [r.headers["RateLimit-Remaining"] for r in c[:2]] == ["1", "0"], [dict(r.headers) for r in c[:2]]
    assert [r.headers["RateLimit-Limit"] for r in c[:2]] == ["12", "12"]
    for r in c[2:] + got["D"]:
        assert r.headers["RateLimit-Limit"] == "12", dict(r.headers)
        assert r.json()["status"] == 429

    # Metrics: a policy counts what it allowed and what it refused; one that
    # had room for a request another refused counts nothing for it.
    assert counts(gateways, "per_client") == (12, 30)  # A's 15 and B's 15
    assert counts(gateways, "route_wide") == (12, 23)  # C's 18 and D's 5
    # dry_wide: charged for the first 3 that went; would have refused the
    # other 9 that went and every refused one (it had no room for them either).
    assert counts(gateways, "dry_wide") == (3, 62)
    for gw in gateways:
        assert gw.metrics().value(FALLBACKS) == 0


@pytest.mark.parametrize("store", ["local", "redis"])
def test_refused_request_costs_other_policies_nothing(stack, request, store):
    redis = request.getfixturevalue("redis_server") if store == "redis" else None
    if redis:
        redis.flushall()
    gw, up = start_gateway(stack, store, redis)
    check_sequence([gw], up, [gw.url("/two/echo")])
    if store == "redis":
        # What Redis holds: route_wide 12 periods of 5 s, dry_wide 3 of 20 s,
        # A and B 5 of 12 s, C 2, D none.
        assert_charged(redis, rl_key("route_wide", "two"), 12, 5000000)
        assert_charged(redis, rl_key("dry_wide", "two"), 3, 20000000)
        for client, periods in (("A", 5), ("B", 5), ("C", 2)):
            assert_charged(redis, rl_key("per_client", client), periods, 12000000)
        assert tat_ahead_us(redis, rl_key("per_client", "D")) is None
        assert redis.cli("pttl", rl_key("route_wide", "two")).strip().isdigit()


def test_redis_two_gateways_share_all_or_nothing(stack, redis_server):
    """Two gateway instances on one Redis: clients take turns between them."""
    redis_server.flushall()
    gw1, up = start_gateway(stack, "redis", redis_server, name="gw-a")
    gw2, _ = start_gateway(stack, "redis", redis_server, up=up, name="gw-b")
    check_sequence([gw1, gw2], up, [gw1.url("/two/echo"), gw2.url("/two/echo")])
    assert_charged(redis_server, rl_key("route_wide", "two"), 12, 5000000)


def race(urls, clients, per_client, threads_per_client=3):
    """Every client sends per_client requests over threads_per_client threads
    (a keep-alive connection each, the gateways in turn), all at once:
    {client: [status, ...]}."""
    jobs = [(c, t) for c in clients for t in range(threads_per_client)]
    barrier = threading.Barrier(len(jobs))
    lock = threading.Lock()
    left = {c: per_client for c in clients}

    def one(job):
        client, t = job
        got = []
        with session() as s:
            url = urls[(clients.index(client) + t) % len(urls)]
            s.get(url.replace("/two/", "/free/"), timeout=10)  # connected before the start
            barrier.wait(timeout=30)
            while True:
                with lock:
                    if left[client] == 0:
                        break
                    left[client] -= 1
                got.append(s.get(url, headers={"X-Client": client}, timeout=10).status_code)
        return client, got

    out = {c: [] for c in clients}
    with ThreadPoolExecutor(len(jobs)) as pool:
        for client, got in pool.map(one, jobs):
            out[client] += got
    return out


@pytest.mark.parametrize("store,instances", [("local", 1), ("redis", 1), ("redis", 2)])
def test_concurrent_clients_exact(stack, request, store, instances):
    """8 clients x 10 requests, 24 connections at once: exactly 12 go in all
    (the route-wide budget), no client more than its 5, the upstream sees 12,
    and the route-wide policy is charged exactly 12 (refused requests cost it
    nothing: with Redis, its TAT is 12 periods ahead)."""
    redis = request.getfixturevalue("redis_server") if store == "redis" else None
    if redis:
        redis.flushall()
    routes = [two_route(), route("free", "up", prefix="/free/")]
    gw, up = start_gateway(stack, store, redis, routes=routes, name="gw-a")
    gateways = [gw]
    if instances == 2:
        gateways.append(start_gateway(stack, store, redis, up=up, routes=routes, name="gw-b")[0])
    clients = ["c%d" % i for i in range(8)]
    got = race([g.url("/two/echo") for g in gateways], clients, 10)
    allowed = {c: s.count(200) for c, s in got.items()}
    statuses = sorted({s for ss in got.values() for s in ss})
    assert statuses == [200, 429], statuses
    assert sum(allowed.values()) == 12, allowed
    assert all(n <= 5 for n in allowed.values()), allowed
    assert up.count(prefix="/two/") == 12
    assert counts(gateways, "route_wide")[0] == 12
    assert counts(gateways, "per_client")[0] == 12
    assert counts(gateways, "dry_wide")[0] == 3
    if redis:
        assert_charged(redis, rl_key("route_wide", "two"), 12, 5000000)
        for c in clients:
            ahead = tat_ahead_us(redis, rl_key("per_client", c))
            if allowed[c] == 0:
                assert ahead is None, (c, ahead)
            else:
                assert_charged(redis, rl_key("per_client", c), allowed[c], 12000000)
    # Afterwards every route-wide refusal stays a refusal, whoever asks.
    r = fresh("GET", gateways[0].url("/two/echo"), headers={"X-Client": "late"})
    assert r.status_code == 429 and r.headers["RateLimit-Limit"] == "12", dict(r.headers)
    for g in gateways:
        assert g.metrics().value(FALLBACKS) == 0


def test_check_refuses_more_than_eight_policies(stack, tmp_path):
    """gateway --check: a route with 9 policies is an error with its place."""
    policies = {"p%d" % i: {"limit": 10, "window": "1m", "key": "client_ip"} for i in range(9)}
    r = route("many", "up", prefix="/many/")
    r["ratelimit"] = sorted(policies)
    cfg = gateway_config({"up": ["127.0.0.1:9"]}, routes=[r], ratelimit={"store": "local", "policies": policies})
    cfg["server"]["listen"] = "127.0.0.1:9"
    path = tmp_path / "many.yaml"
    path.write_text(to_yaml(cfg))
    res = run_gateway(["--check", "-c", str(path)])
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert "routes[0].ratelimit: expected at most 8 policies" in out, out
    assert "found 9" in out, out
    r["ratelimit"] = sorted(policies)[:8]
    path.write_text(to_yaml(cfg))
    res = run_gateway(["--check", "-c", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("store", ["local", "redis"])
def test_dry_run_only_route_refuses_nothing(stack, request, store):
    """A route whose only policy is dry-run (Redis: the one-key script with its
    enforce flag 0): every request goes; the policy is charged for its limit
    and counts the rest as would-be refusals. The route is limited, so its
    answers carry the policy's RateLimit-* (Remaining 0 once it would refuse),
    never Retry-After."""
    redis = request.getfixturevalue("redis_server") if store == "redis" else None
    if redis:
        redis.flushall()
    r = route("dryonly", "up", prefix="/dryonly/")
    r["ratelimit"] = ["dry_wide"]
    gw, up = start_gateway(stack, store, redis, routes=[r])
    answers = send(gw.url("/dryonly/echo"), "A", 6)
    got = codes(answers)
    assert got == [200] * 6, got
    for i, a in enumerate(answers):
        h = a.headers
        assert h.get("RateLimit-Limit") == "3", dict(h)
        assert h.get("RateLimit-Remaining") == str(max(2 - i, 0)), dict(h)
        assert h.get("RateLimit-Reset", "").isdigit() and 20 * min(i + 1, 3) - 1 <= int(h["RateLimit-Reset"]) <= 60, \
            dict(h)
        assert "Retry-After" not in h, dict(h)
    assert up.count(prefix="/dryonly/") == 6
    assert counts([gw], "dry_wide") == (3, 3)
    if redis:
        assert_charged(redis, rl_key("dry_wide", "dryonly"), 3, 20000000)


# --- the scripts themselves, against Redis -----------------------------------------

def script_text(name):
    """A Lua script of ratelimit/rlredis.c (the C string literal, unescaped)."""
    import ast
    import re
    from harness import SOURCE_DIR
    src = (SOURCE_DIR / "ratelimit" / "rlredis.c").read_text()
    m = re.search(r"static const char %s\[\] =(.*?);\n" % name, src, re.S)
    assert m, "no %s in rlredis.c" % name
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return "".join(ast.literal_eval('"%s"' % p) for p in re.findall(r'"((?:[^"\\]|\\.)*)"', body))


class Resp:
    """A minimal Redis client on one socket (RESP2): thousands of commands
    without a redis-cli process each."""

    def __init__(self, port):
        import socket
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _line(self):
        while b"\r\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "redis closed the connection"
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise AssertionError("redis: %s" % rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(65536)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data.decode()
        if kind == b"*":
            return [self._reply() for _ in range(int(rest))]
        raise AssertionError("unexpected reply %r" % line)

    def __call__(self, *args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.sock.sendall(b"".join(out))
        return self._reply()


def test_scripts_match_the_model(redis_server):
    """The two Lua scripts as Redis runs them, on 1000 random cases: one set of
    one key (script_one), or 1..5 sets of 1..8 keys each in one call
    (script_multi), the sets often sharing keys (TATs absent, passed, or ahead
    of Redis's clock; enforced and dry-run; limits small enough to bind).
    Each set's k and each key's wait and k_i, and the TAT and expiry each key
    is left with, against the same arithmetic in Python (exact integers), the
    sets taken one after the other: a key a set charged is seen charged by
    the next."""
    import random
    redis_server.flushall()
    rnd = random.Random(5)
    cmd = Resp(redis_server.port)
    one, multi = script_text("script_one"), script_text("script_multi")
    multi_calls = shared = 0
    for case in range(1000):
        single = case % 4 == 0
        nsets = 1 if single or case % 4 == 1 else rnd.randint(2, 5)
        pool = ["rl:model:%d:%d" % (case, i) for i in range(1 if single else rnd.randint(1, 10))]
        sec, usec = cmd("time")
        approx_now = int(sec) * 1000000 + int(usec)
        ahead = {}
        for key in pool:
            kind = rnd.choice(["absent", "past", "ahead"])
            if kind == "ahead":  # well ahead of the clock at the script's run: base = TAT
                cmd("set", key, approx_now + 5000000 + rnd.randint(0, 40000000))
            elif kind == "past":
                cmd("set", key, approx_now - rnd.randint(1, 10000000))
            ahead[key] = kind == "ahead"
        sets = []
        for _ in range(nsets):
            keys = rnd.sample(pool, 1 if single else rnd.randint(1, len(pool) if len(pool) < 8 else 8))
            pols = [(rnd.choice([1, 7, 1000, 999983, rnd.randint(1, 3000000)]), rnd.randint(1, 12),
                     rnd.random() < 0.7) for _ in keys]
            sets.append((keys, pols, rnd.randint(1, 40)))
        before = {key: cmd("get", key) for key in pool}
        all_keys = [key for keys, _, _ in sets for key in keys]
        shared += len(all_keys) != len(set(all_keys))
        if single:
            (keys, pols, n), = sets
            period, limit, enforce = pols[0]
            out = cmd("eval", one, 1, keys[0], n, period, limit, "1" if enforce else "0")
        else:
            multi_calls += 1
            argv = [str(nsets)]
            for keys, pols, n in sets:
                argv += [str(n), str(len(keys))]
                for period, limit, enforce in pols:
                    argv += [str(period), str(limit), "1" if enforce else "0"]
            out = cmd("eval", multi, len(all_keys), *all_keys, *argv)
        assert len(out) == sum(1 + 2 * len(keys) for keys, _, _ in sets), (case, out)
        # Every key's TAT relative to the script's now (None: not ahead of it),
        # as the model moves it, set after set.
        rel = {}
        first_wait = {}
        at = 0
        for s, (keys, pols, n) in enumerate(sets):
            k, waits, rooms = out[at], out[at + 1:at + 1 + 2 * len(keys):2], out[at + 2:at + 1 + 2 * len(keys):2]
            at += 1 + 2 * len(keys)
            want_k = n
            for i, key in enumerate(keys):
                period, limit, enforce = pols[i]
                if key not in first_wait:  # as the call found it
                    first_wait[key] = waits[i]
                    if not ahead[key]:
                        assert waits[i] == 0, (case, s, i, waits[i])  # absent or passed: base = now
                    rel[key] = waits[i]
                else:  # as an earlier set of the call left it
                    assert waits[i] == rel[key], (case, s, i, waits[i], rel[key])
                room = period * limit - waits[i]  # now + window - base
                ki = min(n, room // period) if room >= period else 0
                assert rooms[i] == ki, (case, s, i, pols[i], waits[i], rooms[i], ki)
                if enforce:
                    want_k = min(want_k, ki)
            assert k == want_k, (case, s, k, want_k, pols, rooms)
            for i, key in enumerate(keys):
                charged = min(k, rooms[i])
                if charged:
                    rel[key] = waits[i] + charged * pols[i][0]
        # Redis's now at the run, from a key whose TAT was ahead (base = TAT), else unknown
        nows = {int(before[key]) - first_wait[key] for key in first_wait if ahead[key]}
        assert len(nows) <= 1, (case, nows)
        now = nows.pop() if nows else None
        for key in first_wait:
            after = cmd("get", key)
            if rel[key] == first_wait[key]:  # never charged: as it was
                assert after == before[key], (case, key, before[key], after)
                continue
            px = rel[key] // 1000 + 1  # the expiry the last SET gave it, ms
            if not after:  # expired since: only a short one may have
                assert px < 1000, (case, key, px)
                continue
            if now is not None:
                assert int(after) == now + rel[key], (case, key)
            pttl = cmd("pttl", key)
            assert pttl <= px and (pttl >= 0 or pttl == -2), (case, key, pttl, px)
    assert multi_calls > 600 and shared > 300, (multi_calls, shared)
    cmd.close()
