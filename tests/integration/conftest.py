"""pytest glue for the integration suite.

A Stack owns everything one test (fixture `stack`) or one test file (fixture
`module_stack`) starts: gateways, test upstreams, dead ports, in one scratch
directory. Its finalizer stops them all even when the test failed: upstream delays
are cut short first, then every gateway gets SIGTERM and must exit 0 without a
sanitizer report (a teardown error otherwise), then the upstreams close. When a
test fails, the logs of every gateway still running and the last requests each
upstream saw are attached to the report.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from upstream import DeadPort, Upstream  # noqa: E402

ACTIVE_UPSTREAMS = []


class Stack:
    def __init__(self, label):
        self.scratch = harness.scratch_dir("gw-%s-" % label)
        self.gateways = []
        self.upstreams = []
        self.dead_ports = []

    def gateway(self, config, name=None, start=True, **kw):
        name = name or ("gateway" if not self.gateways else "gateway%d" % (len(self.gateways) + 1))
        gw = harness.Gateway(config, scratch=self.scratch, name=name, **kw)
        self.gateways.append(gw)
        if start:
            gw.start()
        return gw

    def upstream(self, name="up", **kw):
        up = Upstream(name=name, **kw).start()
        self.upstreams.append(up)
        ACTIVE_UPSTREAMS.append(up)
        return up

    def dead_port(self):
        d = DeadPort()
        self.dead_ports.append(d)
        return d

    def close(self):
        errors = []
        for up in self.upstreams:
            up._stop_event.set()
        for gw in reversed(self.gateways):
            try:
                gw.stop()
            except Exception as e:  # noqa: BLE001 - report all, stop all
                errors.append(str(e))
            finally:
                gw.kill()
        for up in self.upstreams:
            up.stop()
            if up in ACTIVE_UPSTREAMS:
                ACTIVE_UPSTREAMS.remove(up)
        for d in self.dead_ports:
            d.close()
        if not os.environ.get("GATEWAY_TEST_KEEP"):
            harness.cleanup_dir(self.scratch)
        if errors:
            pytest.fail("\n\n".join(errors), pytrace=False)


def pytest_configure(config):
    # Self-signed test certificates and a deliberate TLS 1.1 client: expected, not news.
    config.addinivalue_line("filterwarnings", "ignore::urllib3.exceptions.InsecureRequestWarning")
    config.addinivalue_line("filterwarnings", "ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")


@pytest.fixture
def stack(request):
    s = Stack(request.node.name[:40].replace("/", "_").replace("[", "_").replace("]", ""))
    yield s
    s.close()


@pytest.fixture(scope="module")
def module_stack(request):
    s = Stack(request.module.__name__)
    yield s
    s.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for gw in list(harness.ACTIVE):
            rep.sections.append(("gateway %s" % gw.name, gw.summary()))
        for up in list(ACTIVE_UPSTREAMS):
            rep.sections.append(("upstream %s" % up.name, up.summary()))
