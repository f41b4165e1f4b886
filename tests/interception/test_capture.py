"""``meshproxy iptables`` for real: rules installed in a pod namespace, traffic sent through them.

The pod namespace has the rules and the sidecar's stand-ins: listeners on 15001 (outbound) and
15006 (inbound) that answer with the original destination they read (SO_ORIGINAL_DST), an
"app" on 8080 and a readiness listener on 15021. The peer namespace holds a "remote" service on
8080 and 9090. Which listener answers says where the connection went.
"""

from __future__ import annotations

import os
import stat

import pytest

from tests.interception.conftest import PEER_IP, PEER_IP6, POD_IP, POD_IP6, netns_unavailable

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))

PROXY = 1337


@pytest.fixture
def pod(netns):
    """The namespaces with every listener up and no rules yet."""
    netns.listen(
        netns.pod,
        "outbound:0.0.0.0:15001",
        "inbound:0.0.0.0:15006",
        "outbound6:[::]:15001",
        "inbound6:[::]:15006",
        "app:0.0.0.0:8080",
        "ready:0.0.0.0:15021",
    )
    netns.listen(netns.peer, "remote:0.0.0.0:8080", "remote:0.0.0.0:9090", "remote6:[::]:8080")
    return netns


def test_without_rules_traffic_goes_where_it_was_sent(pod):
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"remote {PEER_IP}:8080"
    assert pod.connect(pod.peer, POD_IP, 8080) == f"app {POD_IP}:8080"


def test_outbound_lands_on_15001_which_sees_the_original_destination(pod):
    pod.meshproxy_iptables()
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"outbound {PEER_IP}:8080"
    assert pod.connect(pod.pod, PEER_IP, 9090) == f"outbound {PEER_IP}:9090"
    # Anywhere, not only to hosts that exist: the app's connect completes on the sidecar.
    assert pod.connect(pod.pod, "192.0.2.7", 443) == "outbound 192.0.2.7:443"


def test_outbound_ipv6_lands_on_15001_too(pod):
    pod.meshproxy_iptables()
    assert pod.connect(pod.pod, PEER_IP6, 8080) == f"outbound6 [{PEER_IP6}]:8080"


def test_inbound_to_the_pod_lands_on_15006(pod):
    pod.meshproxy_iptables()
    assert pod.connect(pod.peer, POD_IP, 8080) == f"inbound {POD_IP}:8080"
    assert pod.connect(pod.peer, POD_IP6, 8080) == f"inbound6 [{POD_IP6}]:8080"


def test_the_proxy_uid_and_gid_bypass(pod):
    pod.meshproxy_iptables()
    assert pod.connect(pod.pod, PEER_IP, 8080, uid=PROXY, gid=PROXY) == f"remote {PEER_IP}:8080"
    # Either credential alone is enough (a proxy image may run under another uid, group 1337).
    assert pod.connect(pod.pod, PEER_IP, 8080, uid=4242, gid=PROXY) == f"remote {PEER_IP}:8080"
    assert pod.connect(pod.pod, PEER_IP, 8080, uid=PROXY, gid=4242) == f"remote {PEER_IP}:8080"
    assert pod.connect(pod.pod, PEER_IP, 8080, uid=4242, gid=4242) == f"outbound {PEER_IP}:8080"
    assert pod.connect(pod.pod, PEER_IP6, 8080, uid=PROXY, gid=PROXY) == f"remote6 [{PEER_IP6}]:8080"


def test_other_proxy_credentials_are_honoured(pod):
    pod.meshproxy_iptables("--proxy-uid", "2000", "--proxy-gid", "2001")
    assert pod.connect(pod.pod, PEER_IP, 8080, uid=2000, gid=3000) == f"remote {PEER_IP}:8080"
    assert pod.connect(pod.pod, PEER_IP, 8080, uid=PROXY, gid=PROXY) == f"outbound {PEER_IP}:8080"


def test_loopback_stays_local_but_the_proxy_dialling_its_own_pod_goes_inbound(pod):
    pod.meshproxy_iptables()
    # The app and the proxy on localhost: untouched.
    assert pod.connect(pod.pod, "127.0.0.1", 8080) == "app 127.0.0.1:8080"
    assert pod.connect(pod.pod, "127.0.0.1", 8080, uid=PROXY, gid=PROXY) == "app 127.0.0.1:8080"
    # The app calling its own pod address stays local (Istio's rule).
    assert pod.connect(pod.pod, POD_IP, 8080) == f"app {POD_IP}:8080"
    # The outbound proxy picked this very pod as the endpoint: through the inbound side.
    assert pod.connect(pod.pod, POD_IP, 8080, uid=PROXY, gid=PROXY) == f"inbound {POD_IP}:8080"
    # ...and the inbound proxy's own hop to the app, from the passthrough source, reaches the app.
    assert pod.connect(pod.pod, POD_IP, 8080, uid=PROXY, gid=PROXY, source="127.0.0.6") == f"app {POD_IP}:8080"


def test_excluded_outbound_ports_bypass(pod):
    pod.meshproxy_iptables("--exclude-outbound-ports", "9090,5432")
    assert pod.connect(pod.pod, PEER_IP, 9090) == f"remote {PEER_IP}:9090"
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"outbound {PEER_IP}:8080"


def test_excluded_outbound_cidrs_bypass(pod):
    pod.meshproxy_iptables("--exclude-outbound-cidrs", f"{PEER_IP}/32,{PEER_IP6}/128")
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"remote {PEER_IP}:8080"
    assert pod.connect(pod.pod, PEER_IP6, 8080) == f"remote6 [{PEER_IP6}]:8080"
    assert pod.connect(pod.pod, "192.0.2.7", 443) == "outbound 192.0.2.7:443"


def test_only_included_outbound_cidrs_are_captured(pod):
    pod.meshproxy_iptables("--include-outbound-cidrs", "192.0.2.0/24")
    assert pod.connect(pod.pod, "192.0.2.7", 443) == "outbound 192.0.2.7:443"
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"remote {PEER_IP}:8080"
    # No IPv6 range is included, so no IPv6 destination is.
    assert pod.connect(pod.pod, PEER_IP6, 8080) == f"remote6 [{PEER_IP6}]:8080"


def test_excluded_inbound_ports_bypass(pod):
    pod.meshproxy_iptables("--exclude-inbound-ports", "8080")
    assert pod.connect(pod.peer, POD_IP, 8080) == f"app {POD_IP}:8080"


def test_the_proxys_own_inbound_ports_are_never_captured(pod):
    pod.meshproxy_iptables("--include-inbound-ports", "8080,15021")
    assert pod.connect(pod.peer, POD_IP, 15021) == f"ready {POD_IP}:15021"
    assert pod.connect(pod.peer, POD_IP, 8080) == f"inbound {POD_IP}:8080"
    pod.meshproxy_iptables()
    assert pod.connect(pod.peer, POD_IP, 15021) == f"ready {POD_IP}:15021"


def test_only_included_inbound_ports_are_captured(pod):
    pod.meshproxy_iptables("--include-inbound-ports", "9000")
    assert pod.connect(pod.peer, POD_IP, 8080) == f"app {POD_IP}:8080"
    pod.meshproxy_iptables("--include-inbound-ports", "")
    assert pod.connect(pod.peer, POD_IP, 8080) == f"app {POD_IP}:8080"


def test_running_twice_gives_the_same_rules(pod):
    pod.meshproxy_iptables("--exclude-outbound-ports", "9090")
    first = pod.save(4), pod.save(6)
    assert "-A MESHPROXY_OUTPUT" in first[0] and "-A MESHPROXY_OUTPUT" in first[1]
    pod.meshproxy_iptables("--exclude-outbound-ports", "9090")
    assert (pod.save(4), pod.save(6)) == first
    assert first[0].count("-j MESHPROXY_OUTPUT") == 1 and first[0].count("-j MESHPROXY_INBOUND") == 1


def test_rerunning_with_other_options_replaces_the_rules(pod):
    pod.meshproxy_iptables("--exclude-outbound-ports", "9090")
    pod.meshproxy_iptables()
    assert pod.connect(pod.pod, PEER_IP, 9090) == f"outbound {PEER_IP}:9090"
    assert "9090" not in pod.save(4)


def test_cleanup_restores_the_namespace_and_is_idempotent(pod):
    before = pod.save(4), pod.save(6)
    pod.meshproxy_iptables()
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"outbound {PEER_IP}:8080"
    done = pod.meshproxy_iptables("--cleanup")
    assert "removed" in done.stdout
    assert (pod.save(4), pod.save(6)) == before
    assert "MESHPROXY" not in pod.save(4) + pod.save(6)
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"remote {PEER_IP}:8080"
    again = pod.meshproxy_iptables("--cleanup")
    assert "nothing to clean up" in again.stdout


def test_cleanup_leaves_other_rules_alone(pod):
    pod.exec(pod.pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN")
    before = pod.save(4)
    pod.meshproxy_iptables()
    pod.meshproxy_iptables("--cleanup")
    assert pod.save(4) == before


def test_dry_run_prints_and_changes_nothing(pod):
    before = pod.save(4), pod.save(6)
    done = pod.meshproxy_iptables("--dry-run", "--exclude-outbound-ports", "9090")
    assert "# iptables-restore --noflush" in done.stdout and "# ip6tables-restore --noflush" in done.stdout
    assert "-A MESHPROXY_OUTPUT -p tcp -m tcp --dport 9090 -j RETURN" in done.stdout
    assert (pod.save(4), pod.save(6)) == before
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"remote {PEER_IP}:8080"


@pytest.mark.parametrize("other_rules", [False, True], ids=["empty-table", "other-rules"])
def test_a_refused_transaction_leaves_nothing_behind(pod, tmp_path, other_rules):
    """IPv6 is refused after IPv4 went in: IPv4 is put back, the exit says why in one line."""
    if other_rules:
        pod.exec(pod.pod, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "--dport", "53", "-j", "RETURN")
    before = pod.save(4), pod.save(6)
    fake = tmp_path / "ip6tables-restore"
    fake.write_text("#!/bin/sh\necho 'ip6tables-restore: simulated refusal' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ.get('PATH', '/usr/sbin:/usr/bin')}"}
    done = pod.meshproxy_iptables(check=False, env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "meshproxy iptables: IPv6: ip6tables-restore refused the rules: ip6tables-restore: simulated refusal"
    )
    assert "Traceback" not in done.stderr
    assert (pod.save(4), pod.save(6)) == before
    assert pod.connect(pod.pod, PEER_IP, 8080) == f"remote {PEER_IP}:8080"
