"""What a rate-limit key is made of, with store: local and store: redis.

A policy's key material is its name and each part of its `key` (`client_ip`,
`route`, `header:NAME`, joined with `+` or given as a list), each followed by
a NUL; an absent header is "\\n", which no header value can be (evhttp
ends a line there), so it is apart from an empty one and from every value. The local store
hashes it (rl_hash), the Redis store names its key `rl:<SHA-1 of it>`.
Checked: nothing of it is cut (header values longer than the old 1 KiB cut,
and more parts than the old 16), and combined keys (client and tenant) give
one bucket per combination, by what the clients got, what the upstream saw,
/metrics, and with Redis the key names in Redis itself.

One redis-server for the file (redis_server.py); gateways of their own per
test (2 workers; trusted_proxies 127.0.0.1, so X-Forwarded-For names the
client). Windows of a minute, so nothing refills while a test runs.
"""

import hashlib

import pytest

from harness import fresh, gateway_config, route, upstream_config
from redis_server import redis_server  # noqa: F401 - the fixture

UPSTREAM_TIMEOUT = "10s"
REQUESTS = "gateway_ratelimit_requests_total"
FALLBACKS = "gateway_ratelimit_store_fallbacks_total"


def rl_key(*parts):
    """The Redis key name of a policy's key material: each part followed by a NUL."""
    return "rl:" + hashlib.sha1(b"".join(p.encode() + b"\0" for p in parts)).hexdigest()


def start_gateway(stack, request, store, policies, routes):
    up = stack.upstream("up")
    rl = {"store": store, "policies": policies, "trusted_proxies": ["127.0.0.1/32"]}
    sections = {"ratelimit": rl}
    redis = None
    if store == "redis":
        redis = request.getfixturevalue("redis_server")
        redis.flushall()
        rl["on_store_error"] = "deny"  # a fallback would show as 429s
        sections["redis"] = redis.redis_section(timeout="2s")
    cfg = gateway_config({"up": upstream_config([up], keepalive=8, timeout=UPSTREAM_TIMEOUT)}, routes=routes,
                         server={"workers": 2}, **sections)
    return stack.gateway(cfg), up, redis


def limited_route(name, policies):
    r = route(name, "up", prefix="/%s/" % name)
    r["ratelimit"] = list(policies)
    return r


def get(gw, path, headers):
    return fresh("GET", gw.url(path), headers=headers).status_code


def counts(gw, policy):
    m = gw.metrics()
    return (m.value(REQUESTS, policy=policy, decision="allowed"),
            m.value(REQUESTS, policy=policy, decision="limited"))


@pytest.mark.parametrize("store", ["local", "redis"])
def test_long_header_values_are_not_cut(stack, request, store):
    """Two X-Long values equal in their first 2000 bytes, different after:
    two buckets of 1 (before, the material was cut at 1024 bytes and the
    second client was refused with the first one's bucket). And a key of 20
    header parts, two clients differing only in the 20th: two buckets
    (before, parts past the 15th were dropped)."""
    many = "+".join("header:X-P%d" % i for i in range(20))
    policies = {"long": {"limit": 1, "window": "1m", "key": "header:X-Long"},
                "many": {"limit": 1, "window": "1m", "key": many}}
    gw, up, redis = start_gateway(stack, request, store, policies,
                                  [limited_route("long", ["long"]), limited_route("many", ["many"])])
    common = "v" * 2000
    a, b = common + "-client-a", common + "-client-b"
    assert get(gw, "/long/echo", {"X-Long": a}) == 200
    assert get(gw, "/long/echo", {"X-Long": a}) == 429  # its bucket of 1 is taken
    assert get(gw, "/long/echo", {"X-Long": b}) == 200, "a value sharing the first 2000 bytes shared the bucket"
    assert get(gw, "/long/echo", {"X-Long": b}) == 429
    assert counts(gw, "long") == (2, 2)

    base = {"X-P%d" % i: "p%d" % i for i in range(19)}
    assert get(gw, "/many/echo", dict(base, **{"X-P19": "a"})) == 200
    assert get(gw, "/many/echo", dict(base, **{"X-P19": "a"})) == 429
    assert get(gw, "/many/echo", dict(base, **{"X-P19": "b"})) == 200, "the 20th part was not in the key"
    assert up.count(prefix="/long/") == 2 and up.count(prefix="/many/") == 2
    assert gw.metrics().value(FALLBACKS) == 0
    if redis:  # the whole material, hashed: one key per value
        for v in (a, b):
            assert redis.cli("exists", rl_key("long", v)).strip() == "1", "no key for the whole value"
        for last in ("a", "b"):
            parts = ["p%d" % i for i in range(19)] + [last]
            assert redis.cli("exists", rl_key("many", *parts)).strip() == "1"


@pytest.mark.parametrize("store", ["local", "redis"])
@pytest.mark.parametrize("syntax", ["joined", "list"])
def test_combined_client_and_header_key(stack, request, store, syntax):
    """key: client_ip+header:X-Tenant (or the list [client_ip, header:X-Tenant]),
    2 per minute: one bucket per (client, tenant). The same client with two
    tenants has two; the same tenant from two clients has two; the same
    client and tenant again shares one. A request without X-Tenant counts in
    the client's "no tenant" bucket (one of its own, apart from an empty
    X-Tenant and from every value: before, an X-Tenant of "\\x01" shared it)."""
    key = "client_ip+header:X-Tenant" if syntax == "joined" else ["client_ip", "header:X-Tenant"]
    gw, up, redis = start_gateway(stack, request, store, {"combo": {"limit": 2, "window": "1m", "key": key}},
                                  [limited_route("combo", ["combo"])])

    def run(client, tenant, n):
        headers = {"X-Forwarded-For": client}
        if tenant is not None:
            headers["X-Tenant"] = tenant
        return [get(gw, "/combo/echo", headers) for _ in range(n)]

    assert run("203.0.113.1", "t1", 3) == [200, 200, 429]
    assert run("203.0.113.1", "t2", 3) == [200, 200, 429]  # same client, other tenant: its own bucket
    assert run("203.0.113.2", "t1", 3) == [200, 200, 429]  # same tenant, other client: its own bucket
    assert run("203.0.113.1", "t1", 1) == [429]  # the same pair shares one
    assert run("203.0.113.1", None, 3) == [200, 200, 429]  # no X-Tenant: the client's own "absent" bucket
    assert run("203.0.113.1", None, 1) == [429]
    assert run("203.0.113.1", "", 3) == [200, 200, 429]  # empty is not absent
    assert run("203.0.113.1", "\x01", 3) == [200, 200, 429]  # nor is any value (was: "\x01" meant absent)
    assert run("203.0.113.2", None, 2) == [200, 200]  # absent, per client
    assert up.count(prefix="/combo/") == 14
    assert counts(gw, "combo") == (14, 8)
    assert gw.metrics().value(FALLBACKS) == 0
    if redis:
        for client, tenant in (("203.0.113.1", "t1"), ("203.0.113.1", "t2"), ("203.0.113.2", "t1"),
                               ("203.0.113.1", "\n"), ("203.0.113.1", ""), ("203.0.113.1", "\x01"),
                               ("203.0.113.2", "\n")):
            assert redis.cli("exists", rl_key("combo", client, tenant)).strip() == "1", (client, tenant)
        assert len(redis.keys("rl:*")) == 7
