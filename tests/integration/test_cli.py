"""Command line: --version, --check on good and bad files, and refusing to run on a
bad file. Every config error is one line `FILE:LINE:COL: key.path: expected ...,
found ...`; these tests know where each planted error sits in the file and check
the line, the column (the key's or the value's), the key path and the value named."""

import re
import socket

import pytest

from harness import (SOURCE_DIR, Gateway, fresh, gateway_config, make_cert, project_version, run_gateway, to_yaml,
                     wait_until)

ERROR_LINE = re.compile(r"^(?P<file>[^\s:][^:]*):(?P<line>\d+):(?P<col>\d+): (?P<key>[^\s:]+): (?P<msg>.*)$")


def errors_of(stderr, filename):
    """The FILE:LINE:COL error lines of stderr that name `filename` (as given or as a path ending in it)."""
    out = []
    for raw in stderr.splitlines():
        m = ERROR_LINE.match(raw.strip())
        if m and (m.group("file") == filename or m.group("file").endswith("/" + filename)):
            out.append({"line": int(m.group("line")), "col": int(m.group("col")), "key": m.group("key"),
                        "msg": m.group("msg"), "raw": raw})
    return out


def position(text, line_no, token):
    """1-based column of `token` on 1-based line `line_no` of text."""
    col = text.splitlines()[line_no - 1].index(token)
    return col + 1


def index_re(name):
    """A key path segment for the first list entry: routes[0], routes.0 or routes[r]."""
    return r"%s(\[0\]|\.0|\[r\]|\.r)" % name


@pytest.fixture
def scratch(stack):
    return stack.scratch


def test_version():
    res = run_gateway(["--version"])
    assert res.returncode == 0, "--version exited %d; stderr: %s" % (res.returncode, res.stderr)
    version = project_version()
    assert version in res.stdout, "--version printed %r on stdout; expected a line with %s" % (res.stdout, version)
    assert len(res.stdout.strip().splitlines()) == 1, "--version should print one line: %r" % res.stdout


def test_check_minimal_good_file(scratch):
    # The listen port is taken by someone else: --check validates, it does not bind.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        cfg = gateway_config({"up": ["127.0.0.1:9"]})
        cfg["server"]["listen"] = "127.0.0.1:%d" % taken.getsockname()[1]
        path = scratch / "good.yaml"
        path.write_text(to_yaml(cfg))
        res = run_gateway(["--check", "-c", str(path)], timeout=20)
    assert res.returncode == 0, "--check of a valid file exited %d\nstderr: %s\nfile:\n%s" % (
        res.returncode, res.stderr, path.read_text())
    assert not errors_of(res.stderr, "good.yaml"), res.stderr


def test_check_example_file(scratch):
    """The spec's full example is valid once the one variable it needs without a
    default is set and the certificate it names exists."""
    example = SOURCE_DIR / "gateway.example.yaml"
    if not example.exists():
        pytest.skip("no gateway.example.yaml at the repository root")
    cert, key = make_cert(scratch)
    text = example.read_text().replace("/etc/gateway/tls.crt", str(cert)).replace("/etc/gateway/tls.key", str(key))
    (scratch / "example.yaml").write_text(text)
    res = run_gateway(["--check", "-c", str(scratch / "example.yaml")], env={"GATEWAY_ADMIN_TOKEN": "s3cret"})
    assert res.returncode == 0, "--check of gateway.example.yaml exited %d\n%s" % (res.returncode, res.stderr)


def test_check_example_file_without_required_variable():
    example = SOURCE_DIR / "gateway.example.yaml"
    if not example.exists():
        pytest.skip("no gateway.example.yaml at the repository root")
    text = example.read_text()
    line_no = next(i for i, ln in enumerate(text.splitlines(), 1) if "${GATEWAY_ADMIN_TOKEN}" in ln)
    res = run_gateway(["--check", "-c", str(example)], unset=("GATEWAY_ADMIN_TOKEN",))
    assert res.returncode == 1, "unset ${GATEWAY_ADMIN_TOKEN} (no default) must be an error; exit %d\n%s" % (
        res.returncode, res.stderr)
    errs = errors_of(res.stderr, "gateway.example.yaml")
    assert any(e["line"] == line_no and "GATEWAY_ADMIN_TOKEN" in e["raw"] for e in errs), (
        "expected an error on line %d naming GATEWAY_ADMIN_TOKEN; stderr:\n%s" % (line_no, res.stderr))


BAD = """\
server:
  listen: "127.0.0.1:8080"
  workers: lots
  read_timeout: 5 parsecs
  max_body_bytes: 12 furlongs
log:
  level: chatty
upstreams:
  up:
    targets: ["127.0.0.1:9"]
routes:
  - name: r
    match: {prefix: /}
    upstream: up
    bogus_key: 1
"""

# (line, key path regex, token whose column (or the key's) the error points at, word the message names)
BAD_ERRORS = [
    (3, r"server\.workers", "lots", "lots"),
    (4, r"server\.read_timeout", "5 parsecs", "parsecs"),
    (5, r"server\.max_body_bytes", "12 furlongs", "furlongs"),
    (7, r"log\.level", "chatty", "chatty"),
    (15, index_re("routes") + r"\.bogus_key", "bogus_key", "bogus_key"),
]


def check_errors(text, errs, expected, stderr):
    for line_no, key_re, token, word in expected:
        line = text.splitlines()[line_no - 1]
        key_col = len(line) - len(line.lstrip(" -")) + 1
        value_col = position(text, line_no, token)
        hits = [e for e in errs if e["line"] == line_no]
        assert hits, "no error reported for line %d (%s); stderr:\n%s" % (line_no, line.strip(), stderr)
        e = hits[0]
        assert re.fullmatch(key_re, e["key"]), "line %d: key path %r does not match %r" % (line_no, e["key"], key_re)
        assert e["col"] in (key_col, value_col), "line %d: column %d is neither the key's (%d) nor the value's (%d)" % (
            line_no, e["col"], key_col, value_col)
        assert "expected" in e["msg"] and "found" in e["msg"], "line %d: message is not 'expected ..., found ...': %r" % (
            line_no, e["raw"])
        assert word in e["msg"], "line %d: message should name what was found (%r): %r" % (line_no, word, e["raw"])


def test_check_bad_file_reports_every_error(scratch):
    (scratch / "bad.yaml").write_text(BAD)
    res = run_gateway(["--check", "-c", "bad.yaml"], cwd=str(scratch))
    assert res.returncode == 1, "--check of a bad file exited %d\nstderr: %s" % (res.returncode, res.stderr)
    errs = errors_of(res.stderr, "bad.yaml")
    check_errors(BAD, errs, BAD_ERRORS, res.stderr)


def test_check_bad_reference(scratch):
    text = BAD.replace("workers: lots", "workers: 2").replace("5 parsecs", "5s").replace("12 furlongs", "1MiB") \
              .replace("chatty", "info").replace("    bogus_key: 1\n", "").replace("upstream: up", "upstream: nowhere")
    (scratch / "ref.yaml").write_text(text)
    res = run_gateway(["--check", "-c", "ref.yaml"], cwd=str(scratch))
    assert res.returncode == 1, "a route naming an undefined upstream must be an error; exit %d\n%s" % (
        res.returncode, res.stderr)
    errs = errors_of(res.stderr, "ref.yaml")
    assert len(errs) == 1, "expected exactly one error; stderr:\n%s" % res.stderr
    check_errors(text, errs, [(14, index_re("routes") + r"\.upstream", "nowhere", "nowhere")], res.stderr)


def test_check_yaml_syntax_error(scratch):
    text = "server:\n  listen: \"127.0.0.1:8080\"\n  workers: [1, 2\nlog:\n  level: info\n"
    (scratch / "syntax.yaml").write_text(text)
    res = run_gateway(["--check", "-c", "syntax.yaml"], cwd=str(scratch))
    assert res.returncode == 1, "a YAML syntax error must fail --check; exit %d\n%s" % (res.returncode, res.stderr)
    errs = errors_of(res.stderr, "syntax.yaml")
    assert errs, "no FILE:LINE:COL error line for a syntax error; stderr:\n%s" % res.stderr
    assert all(3 <= e["line"] <= 6 for e in errs), "syntax error reported on an unlikely line:\n%s" % res.stderr


def test_check_missing_file(scratch):
    res = run_gateway(["--check", "-c", str(scratch / "nope.yaml")])
    assert res.returncode == 1, "missing file: exit %d\n%s" % (res.returncode, res.stderr)
    assert "nope.yaml" in res.stderr, "the error should name the file: %r" % res.stderr


def test_run_refuses_bad_file(stack):
    (stack.scratch / "bad.yaml").write_text(BAD)
    gw = Gateway(BAD, scratch=stack.scratch, name="bad")
    gw.config_path.write_text(BAD)
    gw._spawn()
    try:
        rc = gw.wait_exit(10)
        assert rc is not None, "gateway kept running with an invalid config file"
        assert rc != 0, "gateway exited 0 with an invalid config file"
        assert errors_of(gw.stderr(), gw.config_path.name), "no FILE:LINE:COL errors on stderr:\n%s" % gw.stderr()
        for m in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
            assert m not in gw.stderr(), "sanitizer report:\n%s" % gw.stderr()
    finally:
        gw.kill()


def test_run_and_stop(stack):
    """The smallest run: starts, answers /live and /ready, exits 0 on SIGTERM."""
    up = stack.upstream()
    gw = stack.gateway(gateway_config({"up": [up]}))
    assert fresh("GET", gw.url("/live")).status_code == 200
    wait_until(lambda: fresh("GET", gw.url("/ready")).status_code == 200, 10, "GET /ready answers 200")
    gw.stop()
