"""Configuration edges: an absurdly long ${VAR} name (with and without a default)
is a clean configuration error from --check (exit 1, a FILE:LINE:COL line), never
a crash; and a second gateway on a server.listen address a running gateway holds
fails to start, naming the address, instead of silently sharing the port."""

import re
import time

import pytest

from harness import Gateway, fresh, gateway_config, run_gateway, to_yaml

ERROR_LINE = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<key>[^\s:]+): (?P<msg>.*)$")


def error_lines(stderr, filename):
    out = []
    for raw in stderr.splitlines():
        m = ERROR_LINE.match(raw.strip())
        if m and (m.group("file") == filename or m.group("file").endswith("/" + filename)):
            out.append(m)
    return out


@pytest.mark.parametrize("form", ["with-default", "without-default"])
def test_huge_env_variable_name_is_a_config_error(stack, form):
    name = "A" * 5000
    ref = "${%s:-x}" % name if form == "with-default" else "${%s}" % name
    cfg = gateway_config({"up": ["127.0.0.1:9"]})
    cfg["server"]["listen"] = "127.0.0.1:1"
    # A route name: were the reference expanded to its default "x", the file would be valid.
    cfg["routes"][0]["name"] = ref
    path = stack.scratch / "huge-var.yaml"
    path.write_text(to_yaml(cfg))
    assert ref in path.read_text()
    res = run_gateway(["--check", "-c", str(path)], timeout=20)
    assert res.returncode == 1, "--check with a %d-character variable name exited %d (expected 1)\nstderr: %s" % (
        len(name), res.returncode, res.stderr[-2000:])
    errs = error_lines(res.stderr, "huge-var.yaml")
    assert errs, "no FILE:LINE:COL: key: message line naming the file in stderr:\n%s" % res.stderr[-2000:]
    line_no = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if name in line)
    assert any(int(m.group("line")) == line_no for m in errs), "errors %s do not point at line %d" % (
        [m.group(0)[:200] for m in errs], line_no)
    assert any("route" in m.group("key") for m in errs), [m.group(0)[:200] for m in errs]
    assert len(res.stderr) < 20000, "stderr is %d bytes for one error" % len(res.stderr)


def test_second_gateway_on_same_listen_port_fails(stack):
    up = stack.upstream()
    first = stack.gateway(gateway_config({"up": [up]}))
    addr = "127.0.0.1:%d" % first.port

    second = Gateway(gateway_config({"up": [up]}), scratch=stack.scratch, name="second")
    second.port = first.port  # not start(): that would pick a free port
    second.write_config()
    try:
        second._spawn()
        rc = second.wait_exit(10)
        if rc is None:
            pytest.fail("a second gateway on %s did not exit within 10s (it shares the port)\n%s"
                        % (addr, second.logs()))
        err = second.stderr()
        assert rc != 0, "the second gateway on %s exited 0\n%s" % (addr, second.logs())
        assert rc > 0, "the second gateway on %s died from signal %d\n%s" % (addr, -rc, second.logs())
        assert addr in err, "stderr of the second gateway does not name %s:\n%s" % (addr, err[-2000:])
    finally:
        second.kill()

    # The first one is unharmed.
    assert first.running()
    r = fresh("GET", first.url("/still/first"))
    assert r.status_code == 200 and r.json()["path"] == "/still/first"
    assert up.count(path="/still/first") == 1


def test_second_gateway_check_does_not_bind(stack):
    """--check on the same file as a running gateway validates it: exit 0 (it does not bind)."""
    up = stack.upstream()
    first = stack.gateway(gateway_config({"up": [up]}))
    t0 = time.monotonic()
    res = run_gateway(["--check", "-c", str(first.config_path)])
    assert res.returncode == 0, "--check of a running gateway's file exited %d: %s" % (res.returncode, res.stderr)
    assert time.monotonic() - t0 < 10
    assert first.running()
