"""Access log: one line on stdout per request, carrying the request id the client got
back, the route, method, path, status, bytes, duration and client; JSON lines when
log.format is json, one text line with the same facts when text, none when
log.access is false. Diagnostics stay on stderr."""

import pytest

from harness import fresh, gateway_config, route, upstream_config, wait_until

FIELDS = ("request_id", "route", "method", "path", "status", "bytes", "duration_ms", "client")


def routes():
    return [route("echo-route", "up", prefix="/echo/"), route("slow-route", "up", prefix="/slow/")]


def lines_for(gw, rid):
    return [d for d in gw.access_log() if d.get("request_id") == rid]


def wait_line(gw, rid):
    return wait_until(lambda: lines_for(gw, rid), 5, "access-log line for request %s" % rid)[0]


@pytest.fixture
def json_gateway(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": upstream_config([up], timeout="3s")}, routes=routes(),
                                      log={"format": "json", "access": True}))
    return gw, up


def test_json_line_fields(json_gateway):
    gw, up = json_gateway
    r = fresh("POST", gw.url("/echo/one?x=1"), data=b"12345", headers={"X-Request-Id": "acc-one"})
    assert r.status_code == 200
    line = wait_line(gw, "acc-one")
    missing = [f for f in FIELDS if f not in line]
    assert not missing, "access-log line lacks %s: %s" % (missing, line)
    assert line["route"] == "echo-route"
    assert line["method"] == "POST"
    assert line["path"] in ("/echo/one", "/echo/one?x=1"), line["path"]
    assert line["status"] == 200
    assert isinstance(line["bytes"], int) and len(r.content) <= line["bytes"] <= len(r.content) + 4096, \
        "bytes %r for a %d-byte answer" % (line["bytes"], len(r.content))
    assert isinstance(line["duration_ms"], (int, float)) and 0 <= line["duration_ms"] < 2000, line["duration_ms"]
    assert line["client"] in ("127.0.0.1",) or line["client"].startswith("127.0.0.1:"), line["client"]


def test_duration_is_measured(json_gateway):
    gw, _ = json_gateway
    fresh("GET", gw.url("/slow/delay/300"), headers={"X-Request-Id": "acc-slow"})
    line = wait_line(gw, "acc-slow")
    assert 300 <= line["duration_ms"] < 2000, "duration_ms %r for a 300 ms upstream" % line["duration_ms"]
    assert line["route"] == "slow-route"


def test_one_line_per_request_with_the_id_the_client_got(json_gateway):
    gw, up = json_gateway
    ids = []
    for i in range(20):
        r = fresh("GET", gw.url("/echo/many/%d" % i))
        assert r.status_code == 200
        ids.append(r.headers["X-Request-Id"])
    assert len(set(ids)) == 20

    def all_there():
        log = gw.access_log()
        return all(any(d.get("request_id") == rid for d in log) for rid in ids) and log
    log = wait_until(all_there, 5, "20 access-log lines")
    for i, rid in enumerate(ids):
        mine = [d for d in log if d.get("request_id") == rid]
        assert len(mine) == 1, "request %s has %d access-log lines" % (rid, len(mine))
        assert mine[0]["path"].startswith("/echo/many/%d" % i)
    assert up.count(prefix="/echo/many/") == 20


def test_errors_are_logged(stack, json_gateway):
    gw, _ = json_gateway
    r = fresh("GET", gw.url("/no/route"))
    assert r.status_code == 404
    line = wait_line(gw, r.json()["request_id"])
    assert line["status"] == 404 and line["method"] == "GET"

    dead = stack.dead_port()
    gw2 = stack.gateway(gateway_config({"up": [dead]}), name="dead-gw")
    r = fresh("GET", gw2.url("/echo/x"), headers={"X-Request-Id": "acc-502"})
    assert r.status_code == 502
    line = wait_line(gw2, "acc-502")
    assert line["status"] == 502


def test_stdout_is_only_access_log(json_gateway):
    gw, _ = json_gateway
    for i in range(5):
        fresh("GET", gw.url("/echo/only/%d" % i))
    wait_until(lambda: len([d for d in gw.access_log() if d.get("path", "").startswith("/echo/only/")]) == 5, 5,
               "5 access-log lines")
    for d in gw.access_log():  # access_log() fails on any non-JSON line
        assert "request_id" in d, "stdout line that is not an access-log line: %s" % d


def test_text_format(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}, routes=routes(), log={"format": "text", "access": True}))
    r = fresh("PUT", gw.url("/echo/text-format"), data=b"abc", headers={"X-Request-Id": "acc-text"})
    assert r.status_code == 200

    def line():
        found = [ln for ln in gw.stdout().splitlines() if "acc-text" in ln]
        return found
    found = wait_until(line, 5, "text access-log line with the request id")
    assert len(found) == 1, found
    text = found[0]
    assert not text.lstrip().startswith("{"), "format text wrote JSON: %r" % text
    for fact in ("PUT", "/echo/text-format", "200", "echo-route", "127.0.0.1"):
        assert fact in text, "text access-log line lacks %r: %r" % (fact, text)


def test_access_false_writes_nothing(stack):
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}, routes=routes(), log={"format": "json", "access": False}))
    for i in range(5):
        assert fresh("GET", gw.url("/echo/quiet/%d" % i), headers={"X-Request-Id": "quiet-%d" % i}).status_code == 200
    assert up.count(prefix="/echo/quiet/") == 5
    gw.stop()  # flushes whatever was buffered
    assert "quiet-" not in gw.stdout(), "log.access false, yet stdout has:\n%s" % gw.stdout()[:500]
