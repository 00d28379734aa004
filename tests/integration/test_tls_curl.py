"""HTTPS checked with curl against an RSA certificate made with `openssl req`, the
way an operator would: curl verifies the chain (--cacert) and the name
(localhost, pinned to 127.0.0.1 with --resolve). TLS 1.2 and 1.3 work, TLS 1.1 is
refused; a certificate and key swapped on disk are served after SIGHUP (the new CA
verifies, the old one no longer does). And server.tls added by SIGHUP to a
gateway started without it is accepted but needs a restart: the listener keeps
speaking plain HTTP."""

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading

import pytest

from harness import fresh, gateway_config, wait_until

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "no_proxy",
              "NO_PROXY", "CURL_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR")

pytestmark = pytest.mark.skipif(shutil.which("curl") is None or shutil.which("openssl") is None,
                                reason="curl and openssl are needed")


def openssl_req(directory, stem):
    """`openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=localhost -days 1 -keyout k -out c`."""
    os.makedirs(directory, exist_ok=True)
    key, cert = os.path.join(directory, stem + ".key"), os.path.join(directory, stem + ".crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-days", "1", "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


class CurlResult:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.stderr = proc.stderr
        out = proc.stdout
        m = re.search(r"\nHTTPCODE:(\d+)\Z", out)
        self.code = int(m.group(1)) if m else None
        self.body = out[:m.start()] if m else out
        v = re.search(r"SSL connection using (TLSv[0-9.]+)", proc.stderr)
        self.tls_version = v.group(1) if v else None

    def __repr__(self):
        err = "\n".join(line for line in self.stderr.splitlines()
                        if line.startswith("curl:") or line.startswith("* ") and
                        any(w in line for w in ("SSL", "TLS", "certificate", "alert")))
        return "<curl rc=%s http=%s tls=%s body=%r stderr: %s>" % (self.rc, self.code, self.tls_version,
                                                                   self.body[:200], err[-800:])


def curl(port, path, cacert, *opts, timeout=10):
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    cmd = ["curl", "-q", "-sS", "-v", "--noproxy", "*", "--max-time", str(timeout),
           "--resolve", "localhost:%d:127.0.0.1" % port, "--cacert", str(cacert),
           "-w", "\nHTTPCODE:%{http_code}", *opts, "https://localhost:%d%s" % (port, path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 10, env=env,
                          stdin=subprocess.DEVNULL)
    return CurlResult(proc)


def assert_ok(res, path, version=None):
    assert res.rc == 0 and res.code == 200, "curl %s failed: %r" % (path, res)
    doc = json.loads(res.body)
    assert doc["path"] == path.split("?")[0], doc
    assert doc["headers"].get("x-forwarded-proto") == ["https"], doc["headers"].get("x-forwarded-proto")
    if version:
        assert res.tls_version == version, "negotiated %s, expected %s: %r" % (res.tls_version, version, res)


@pytest.fixture
def tls_env(stack):
    up = stack.upstream()
    cert, key = openssl_req(str(stack.scratch / "pki"), "tls")
    gw = stack.gateway(gateway_config({"up": [up]}, server={"tls": {"cert": cert, "key": key}}))
    return stack, gw, up, cert, key


def test_curl_https_verified(tls_env):
    _, gw, up, cert, _ = tls_env
    res = curl(gw.port, "/curl/echo?x=1", cert)
    assert_ok(res, "/curl/echo?x=1")
    assert up.count(path="/curl/echo") == 1


@pytest.mark.parametrize("opts,version", [
    (("--tlsv1.2", "--tls-max", "1.2"), "TLSv1.2"),
    (("--tlsv1.3",), "TLSv1.3"),
])
def test_curl_tls12_and_13(tls_env, opts, version):
    _, gw, up, cert, _ = tls_env
    path = "/curl/version-%s" % version
    res = curl(gw.port, path, cert, *opts)
    assert_ok(res, path, version)


SECLEVEL0 = ("--ciphers", "DEFAULT:@SECLEVEL=0")


def curl_can_do_tls11(directory):
    """A control: does curl manage a TLS 1.1 exchange with a willing local server?"""
    cert, key = openssl_req(directory, "control")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ssl.SSLError, ValueError):
        return False
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(10)
    stop = threading.Event()

    def serve():
        try:
            c, _ = lsock.accept()
        except OSError:
            return
        try:
            c.settimeout(5)
            with ctx.wrap_socket(c, server_side=True) as tc:
                buf = b""
                while b"\r\n\r\n" not in buf and not stop.is_set():
                    data = tc.recv(4096)
                    if not data:
                        return
                    buf += data
                tc.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except (OSError, ssl.SSLError):
            pass
        finally:
            c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        res = curl(lsock.getsockname()[1], "/control", cert, "--tlsv1.1", "--tls-max", "1.1", *SECLEVEL0, timeout=5)
        return res.rc == 0 and res.code == 200 and res.tls_version == "TLSv1.1"
    finally:
        stop.set()
        lsock.close()
        t.join(10)


def test_curl_tls11_refused(tls_env):
    stack, gw, up, cert, _ = tls_env
    if not curl_can_do_tls11(str(stack.scratch / "control")):
        pytest.skip("curl with this OpenSSL cannot speak TLS 1.1 even to a willing server; nothing to observe")
    res = curl(gw.port, "/curl/tls11", cert, "--tlsv1.1", "--tls-max", "1.1", *SECLEVEL0)
    assert res.rc != 0 and res.code != 200, "a TLS 1.1 client was served: %r" % res
    assert up.count(path="/curl/tls11") == 0


def test_curl_certificate_swap_and_sighup(tls_env):
    stack, gw, up, cert, key = tls_env
    assert_ok(curl(gw.port, "/curl/before-swap", cert), "/curl/before-swap")
    old_ca = str(stack.scratch / "old-ca.crt")
    shutil.copyfile(cert, old_ca)

    new_cert, new_key = openssl_req(str(stack.scratch / "pki-new"), "tls")
    new_ca = str(stack.scratch / "new-ca.crt")
    shutil.copyfile(new_cert, new_ca)
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    gw.reload("success")

    wait_until(lambda: curl(gw.port, "/curl/after-swap-probe", new_ca, timeout=3).code == 200, 5,
               "curl --cacert NEW succeeding after SIGHUP")
    assert_ok(curl(gw.port, "/curl/after-swap", new_ca), "/curl/after-swap")
    res = curl(gw.port, "/curl/old-ca", old_ca)
    assert res.rc != 0 and res.code != 200, "curl --cacert OLD still verified after the swap: %r" % res
    assert res.rc == 60, "expected curl's certificate verification failure (60): %r" % res
    assert up.count(path="/curl/old-ca") == 0


def test_tls_added_by_sighup_needs_restart(stack):
    up = stack.upstream()
    cfg = gateway_config({"up": [up]})
    gw = stack.gateway(cfg)
    assert gw.scheme == "http"
    cert, key = openssl_req(str(stack.scratch / "pki"), "tls")

    with_tls = dict(cfg)
    with_tls["server"] = dict(cfg["server"], tls={"cert": cert, "key": key})
    # Written straight to the file: gw.config stays the plain one, so the harness keeps talking HTTP.
    tmp = gw.config_path.with_suffix(".tmp")
    tmp.write_text(gw.render_config(with_tls))
    os.replace(tmp, gw.config_path)
    err_before = len(gw.stderr())
    gw.reload("success")

    def restart_logged():
        new = gw.stderr()[err_before:]
        return [line for line in new.splitlines() if "restart" in line.lower()]
    lines = wait_until(restart_logged, 5, "a stderr line saying the TLS change needs a restart")
    assert any("tls" in line.lower() for line in lines), "the restart notice does not name server.tls: %s" % lines

    r = fresh("GET", "http://127.0.0.1:%d/plain/after-reload" % gw.port)
    assert r.status_code == 200 and r.json()["path"] == "/plain/after-reload", r.text[:200]
    assert up.count(path="/plain/after-reload") == 1
    res = curl(gw.port, "/tls/after-reload", cert, timeout=3)
    assert res.rc != 0 and res.code != 200, "HTTPS was served without a restart: %r" % res
    assert up.count(path="/tls/after-reload") == 0
    # A second reload of the same file changes nothing either.
    gw.reload("success")
    r = fresh("GET", "http://127.0.0.1:%d/plain/after-second-reload" % gw.port)
    assert r.status_code == 200
    assert gw.running()
