"""HTTPS: TLS 1.2 and 1.3 served, TLS 1.1 refused, X-Forwarded-Proto https, and a
certificate replaced on disk taking effect for new connections after SIGHUP (a
broken one refused, the old one kept)."""

import os
import shutil
import socket
import ssl
import threading

import pytest

from harness import (cert_fingerprint_file, client_context, fresh, gateway_config, make_cert, tls_handshake,
                     wait_until)


@pytest.fixture
def tls_gateway(stack):
    up = stack.upstream()
    cert, key = make_cert(stack.scratch, "tls")
    gw = stack.gateway(gateway_config({"up": [up]}, server={"tls": {"cert": str(cert), "key": str(key)}}))
    return gw, up, cert, key


def test_https_proxying(tls_gateway):
    gw, up, cert, _ = tls_gateway
    assert gw.base.startswith("https://")
    r = fresh("POST", gw.url("/tls/echo"), data=b"over tls")
    assert r.status_code == 200
    doc = r.json()
    assert doc["body"] == "over tls"
    assert doc["headers"].get("x-forwarded-proto") == ["https"], doc["headers"].get("x-forwarded-proto")
    assert up.count(path="/tls/echo") == 1
    assert fresh("GET", gw.url("/live")).status_code == 200


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_versions_served(tls_gateway, version):
    gw, _, cert, _ = tls_gateway
    got, fp = tls_handshake(gw.port, client_context(version, version))
    assert got == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
    assert fp == cert_fingerprint_file(cert)


def _tls11_client_works():
    """Can this machine's OpenSSL speak TLS 1.1 at all? A control, so that a refused
    handshake below means the gateway refused it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tmp = os.path.join(os.environ.get("TMPDIR", "/tmp"), "tls11-control-%d" % os.getpid())
    os.makedirs(tmp, exist_ok=True)
    try:
        cert, key = make_cert(tmp, "control")
        server_ctx.load_cert_chain(str(cert), str(key))
        server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        server_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ssl.SSLError, ValueError):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.settimeout(5)

    def serve():
        try:
            c, _ = lsock.accept()
            with server_ctx.wrap_socket(c, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass
    t = threading.Thread(target=serve)
    t.start()
    try:
        got, _ = tls_handshake(lsock.getsockname()[1], tls11_context())
        return got == "TLSv1.1"
    except (OSError, ssl.SSLError):
        return False
    finally:
        t.join(5)
        lsock.close()
        shutil.rmtree(tmp, ignore_errors=True)


def tls11_context():
    return client_context(ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1, ciphers="DEFAULT:@SECLEVEL=0")


def test_tls11_refused(tls_gateway):
    gw, _, _, _ = tls_gateway
    if not _tls11_client_works():
        pytest.skip("this OpenSSL cannot speak TLS 1.1 even to a willing server; nothing to observe")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        got, _ = tls_handshake(gw.port, tls11_context())
        pytest.fail("TLS 1.1 handshake succeeded (%s)" % got)


def test_plain_http_on_tls_port_not_served(tls_gateway):
    gw, up, _, _ = tls_gateway
    import requests
    try:
        r = fresh("GET", "http://127.0.0.1:%d/plain/echo" % gw.port, timeout=5)
        assert r.status_code != 200 or "server" not in r.text, "plain HTTP was proxied on the TLS port"
    except requests.RequestException:
        pass
    assert up.count(path="/plain/echo") == 0


def test_certificate_reload(tls_gateway, stack):
    gw, up, cert, key = tls_gateway
    old_fp = cert_fingerprint_file(cert)
    ctx = client_context()
    assert tls_handshake(gw.port, ctx)[1] == old_fp

    new_dir = stack.scratch / "new"
    new_dir.mkdir()
    new_cert, new_key = make_cert(new_dir, "tls", cn="localhost-2")
    new_fp = cert_fingerprint_file(new_cert)
    assert new_fp != old_fp
    os.replace(new_key, key)
    os.replace(new_cert, cert)
    gw.reload("success")
    wait_until(lambda: tls_handshake(gw.port, ctx)[1] == new_fp, 5, "new connections see the new certificate")
    assert fresh("GET", gw.url("/tls/after-reload")).status_code == 200

    # A broken certificate file is refused; the current one keeps serving.
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    gw.reload("failure")
    assert tls_handshake(gw.port, ctx)[1] == new_fp, "a refused reload changed the served certificate"
    assert fresh("GET", gw.url("/tls/after-failed-reload")).status_code == 200
    assert up.count(path="/tls/after-failed-reload") == 1
