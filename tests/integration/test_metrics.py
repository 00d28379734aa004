"""/metrics: Prometheus text that promtool accepts, counters equal to the exact
number of requests sent per {route, method, code}, histogram counts that agree,
the in-flight gauge, target_up, build_info and process_* checked against what the
kernel says about the process."""

import os
import subprocess
import threading
import time

import pytest

from harness import fresh, gateway_config, open_fds, project_version, route, upstream_config, wait_until

BUCKETS = [0.005, 0.05, 0.5, 5]

# (method, path, expected code, route label)
TRAFFIC = [("GET", "/echo/a", 200, "r-echo")] * 5 + \
          [("POST", "/echo/b", 200, "r-echo")] * 3 + \
          [("GET", "/status/503", 503, "r-status")] * 4 + \
          [("DELETE", "/status/404", 404, "r-status")] * 2 + \
          [("PUT", "/status/201", 201, "r-status")] * 1 + \
          [("GET", "/nothing/here", 404, "_unmatched")] * 3 + \
          [("PATCH", "/only-get", 405, None)] * 2


class Env:
    pass


@pytest.fixture(scope="module")
def env(module_stack):
    e = Env()
    e.t_before = time.time()
    e.up = module_stack.upstream()
    routes = [route("r-echo", "up", prefix="/echo/"), route("r-status", "up", prefix="/status/"),
              route("r-delay", "up", prefix="/delay/"), route("r-get", "up", path="/only-get", methods=["GET"])]
    e.gw = module_stack.gateway(gateway_config({"up": upstream_config([e.up], timeout="5s")}, routes=routes,
                                               server={"request_timeout": "5s"},
                                               metrics={"path": "/metrics", "buckets": BUCKETS}))
    # Probes: never counted in http_requests_total.
    for path in ("/live", "/ready", "/metrics"):
        assert fresh("GET", e.gw.url(path)).status_code == 200
    for method, path, code, _ in TRAFFIC:
        r = fresh(method, e.gw.url(path), data=b"x" if method in ("POST", "PUT") else None)
        assert r.status_code == code, "%s %s: %d" % (method, path, r.status_code)
    e.m = e.gw.metrics()
    return e


def expected_counts():
    out = {}
    for method, _, code, rt in TRAFFIC:
        key = (rt, method, str(code))
        out[key] = out.get(key, 0) + 1
    return out


def test_promtool_accepts(env):
    res = subprocess.run(["promtool", "check", "metrics"], input=env.m.text, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode == 0, "promtool check metrics (exit %d):\n%s%s" % (res.returncode, res.stdout, res.stderr)


def test_content_type(env):
    r = fresh("GET", env.gw.url("/metrics"))
    assert r.headers.get("Content-Type", "").startswith("text/plain"), r.headers.get("Content-Type")


def test_request_counters_exact(env):
    m = env.m
    assert m.types.get("http_requests_total") == "counter", m.types.get("http_requests_total")
    for (rt, method, code), n in expected_counts().items():
        if rt is None:
            continue
        got = m.get("http_requests_total", route=rt, method=method, code=code)
        assert got == n, "http_requests_total{route=%r,method=%r,code=%r} = %r, sent %d" % (rt, method, code, got, n)
    # 405s: counted once each under whatever route label the gateway chose.
    got405 = m.sum("http_requests_total", method="PATCH", code="405")
    assert got405 == 2, "PATCH 405 counted %r times, sent 2" % got405
    total = m.sum("http_requests_total")
    assert total == len(TRAFFIC), "http_requests_total sums to %r, %d requests were sent " \
                                  "(probes and scrapes must not count)" % (total, len(TRAFFIC))


def test_duration_histogram_counts(env):
    m = env.m
    assert m.types.get("http_request_duration_seconds") == "histogram"
    for rt in ("r-echo", "r-status"):
        n = sum(1 for _, _, _, r in TRAFFIC if r == rt)
        count = m.get("http_request_duration_seconds_count", route=rt)
        assert count == n, "http_request_duration_seconds_count{route=%r} = %r, sent %d" % (rt, count, n)
        check_histogram(m, "http_request_duration_seconds", route=rt)
    # Every route label counted in http_requests_total has as many observations.
    for rt in {lab["route"] for lab, _ in m.series("http_requests_total")}:
        n = m.sum("http_requests_total", route=rt)
        count = m.get("http_request_duration_seconds_count", route=rt)
        assert count == n, "http_request_duration_seconds_count{route=%r} = %r, http_requests_total says %d" % (
            rt, count, n)


def check_histogram(m, name, **labels):
    buckets = sorted(((float(lab["le"]), v) for lab, v in m.series(name + "_bucket", **labels)),
                     key=lambda x: x[0])
    les = [le for le, _ in buckets]
    assert les == BUCKETS + [float("inf")], "%s%s buckets %s, configured %s" % (name, labels, les, BUCKETS)
    values = [v for _, v in buckets]
    assert values == sorted(values), "%s%s buckets not cumulative: %s" % (name, labels, values)
    assert values[-1] == m.get(name + "_count", **labels), "+Inf bucket != _count"
    s = m.get(name + "_sum", **labels)
    assert s is not None and 0 <= s < 60 * values[-1], "%s_sum%s = %r" % (name, labels, s)


def test_upstream_histogram(env):
    m = env.m
    assert m.types.get("gateway_upstream_request_duration_seconds") == "histogram"
    n = sum(1 for _, _, _, r in TRAFFIC if r in ("r-echo", "r-status"))
    got = m.get("gateway_upstream_request_duration_seconds_count", upstream="up")
    assert got == n, "upstream requests counted %r, %d went upstream" % (got, n)
    assert env.up.count() == n, "the upstream itself saw %d requests, expected %d" % (env.up.count(), n)
    check_histogram(m, "gateway_upstream_request_duration_seconds", upstream="up")


def test_target_up(env):
    assert env.m.get("gateway_upstream_target_up", upstream="up", target=env.up.address) == 1


def test_build_info(env):
    assert env.m.get("gateway_build_info", version=project_version()) == 1, \
        [s for s in env.m.samples if s[0] == "gateway_build_info"]


def test_reload_counters_present(env):
    """Both series exist from the start at 0: an alert on
    increase(gateway_config_reloads_total{result="failure"}[5m]) cannot see the
    first failure if the series only appears with it."""
    for result in ("success", "failure"):
        got = env.m.get("gateway_config_reloads_total", result=result)
        assert got == 0, "gateway_config_reloads_total{result=%r} is %r before any reload; expected 0" % (result, got)


def test_process_metrics(env):
    m = env.gw.metrics()
    pid = env.gw.pid
    rss = m.get("process_resident_memory_bytes")
    with open("/proc/%d/status" % pid) as f:
        vmrss = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("VmRSS:"))
    assert rss and 0.5 * vmrss <= rss <= 2 * vmrss, "process_resident_memory_bytes %r, VmRSS %d" % (rss, vmrss)
    cpu = m.get("process_cpu_seconds_total")
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert cpu is not None and abs(cpu - used) <= 0.5 + 0.2 * used, \
        "process_cpu_seconds_total %r, /proc/%d/stat says %.2f" % (cpu, pid, used)
    fds = m.get("process_open_fds")
    actual = open_fds(pid)
    assert fds is not None and abs(fds - actual) <= 8, "process_open_fds %r, /proc says %d" % (fds, actual)
    with open("/proc/%d/limits" % pid) as f:
        soft = next(int(ln.split()[3]) for ln in f if ln.startswith("Max open files"))
    assert m.get("process_max_fds") == soft, "process_max_fds %r, /proc/%d/limits says %d" % (
        m.get("process_max_fds"), pid, soft)
    start = m.get("process_start_time_seconds")
    assert start is not None and env.t_before - 5 <= start <= time.time() + 1, \
        "process_start_time_seconds %r, test started %f" % (start, env.t_before)


def test_in_flight_gauge(env):
    m = env.gw.metrics()
    assert m.get("http_requests_in_flight") == 0, "in flight with nothing running: %r" % m.get(
        "http_requests_in_flight")
    threads = [threading.Thread(target=fresh, args=("GET", env.gw.url("/delay/1500"))) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert env.up.wait_in_flight(3, 5), "the 3 slow requests did not reach the upstream"
        got = env.gw.metrics().get("http_requests_in_flight")
        assert got in (3, 4), "http_requests_in_flight = %r with 3 requests in flight" % got
    finally:
        for t in threads:
            t.join(10)
    wait_until(lambda: env.gw.metrics().get("http_requests_in_flight") == 0, 5, "in flight back to 0")


def test_counters_only_grow_and_stay_exact(env):
    before = env.gw.metrics().value("http_requests_total", route="r-echo", method="GET", code="200")
    for i in range(7):
        assert fresh("GET", env.gw.url("/echo/more")).status_code == 200
    after = env.gw.metrics().value("http_requests_total", route="r-echo", method="GET", code="200")
    assert after == before + 7, "%r -> %r after 7 requests" % (before, after)
