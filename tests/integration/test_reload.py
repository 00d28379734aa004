"""SIGHUP reload: a route added to the file takes effect, one removed stops matching,
an upstream's targets change; a broken file (syntax error, unknown key, bad value)
is refused with its errors on stderr while the old configuration keeps serving,
and gateway_config_reloads_total counts both outcomes. Reloads under traffic lose
no request."""

import copy
import re
import threading

from harness import fresh, gateway_config, route, session, upstream_config


def base(up):
    return gateway_config({"up": upstream_config([up])}, routes=[route("a", "up", prefix="/a/")])


def test_route_added_and_removed(stack):
    up = stack.upstream()
    cfg = base(up)
    gw = stack.gateway(cfg)
    assert fresh("GET", gw.url("/a/x")).status_code == 200
    r = fresh("GET", gw.url("/b/x"))
    assert r.status_code == 404, "no route /b/ yet: %d" % r.status_code
    assert up.count(path="/b/x") == 0

    added = copy.deepcopy(cfg)
    added["routes"].append(route("b", "up", prefix="/b/"))
    gw.write_config(added)
    counts = gw.reload("success")
    assert counts == {"success": 1, "failure": 0}, counts
    r = fresh("GET", gw.url("/b/x"))
    assert r.status_code == 200, "route added by SIGHUP not serving: %d %r" % (r.status_code, r.text[:200])
    assert up.count(path="/b/x") == 1
    assert fresh("GET", gw.url("/a/x")).status_code == 200

    removed = copy.deepcopy(added)
    removed["routes"] = [rt for rt in removed["routes"] if rt["name"] != "a"]
    gw.write_config(removed)
    gw.reload("success")
    assert fresh("GET", gw.url("/a/gone")).status_code == 404
    assert up.count(path="/a/gone") == 0
    assert fresh("GET", gw.url("/b/y")).status_code == 200
    # The new route's name is the metrics label now.
    m = gw.metrics()
    assert m.get("http_requests_total", route="b", method="GET", code="200") == 2, m.series("http_requests_total")


def test_upstream_targets_changed(stack):
    one, two = stack.upstream("one"), stack.upstream("two")
    gw = stack.gateway(gateway_config({"up": upstream_config([one])}))
    assert fresh("GET", gw.url("/t/1")).json()["server"] == "one"
    gw.write_config(gateway_config({"up": upstream_config([two])}))
    gw.reload("success")
    for i in range(5):
        r = fresh("GET", gw.url("/t/after/%d" % i))
        assert r.status_code == 200 and r.json()["server"] == "two", r.text[:200]
    assert one.count(prefix="/t/after/") == 0


BROKEN = {
    "syntax": lambda text: text.replace("routes:", "routes: [\n"),
    "unknown-key": lambda text: text.replace("log:\n", "log:\n  colour: purple\n"),
    "bad-value": lambda text: text.replace("workers: 2", "workers: -3"),
    "undefined-upstream": lambda text: text.replace("upstream: up", "upstream: nowhere"),
}


def test_broken_file_keeps_old_config(stack):
    up = stack.upstream()
    cfg = base(up)
    gw = stack.gateway(cfg)
    good_text = gw.render_config()
    expected_failures = 0
    for kind, breaker in BROKEN.items():
        bad = breaker(good_text)
        assert bad != good_text, kind
        gw.write_config(bad.replace("127.0.0.1:%d" % gw.port, "127.0.0.1:@PORT@"))
        err_before = len(gw.stderr())
        counts = gw.reload("failure")
        expected_failures += 1
        assert counts == {"success": 0, "failure": expected_failures}, (kind, counts)
        new_err = gw.stderr()[err_before:]
        name = re.escape(gw.config_path.name)
        assert re.search(name + r":\d+:\d+: ", new_err), \
            "%s: the refused reload should log FILE:LINE:COL errors; stderr got:\n%s" % (kind, new_err)
        r = fresh("GET", gw.url("/a/still"))
        assert r.status_code == 200, "%s: old routes stopped serving after a refused reload: %d" % (kind, r.status_code)
        assert gw.running()
    assert up.count(path="/a/still") == len(BROKEN)

    # Fixed again: accepted.
    gw.write_config(cfg)
    assert gw.reload("success") == {"success": 1, "failure": len(BROKEN)}
    assert fresh("GET", gw.url("/a/fixed")).status_code == 200


def test_reloads_under_traffic_lose_nothing(stack):
    up = stack.upstream()
    cfg = base(up)
    gw = stack.gateway(cfg)
    stop = threading.Event()
    results = []

    def client(n):
        with session() as s:
            i = 0
            while not stop.is_set():
                try:
                    r = s.get(gw.url("/a/load/%d/%d" % (n, i)), timeout=5)
                    results.append(r.status_code)
                except Exception as e:  # noqa: BLE001
                    results.append(repr(e))
                i += 1
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(6):
            variant = copy.deepcopy(cfg)
            variant["routes"].append(route("extra-%d" % i, "up", prefix="/extra%d/" % i))
            gw.write_config(variant)
            gw.reload("success")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    bad = [r for r in results if r != 200]
    assert results and not bad, "%d of %d requests failed during reloads: %s" % (len(bad), len(results), bad[:5])
    assert up.count(prefix="/a/load/") == len(results)
