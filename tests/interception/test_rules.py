"""``meshproxy iptables`` without root: the rules it generates, the transactions it builds from
the current nat table, and its command line."""

from __future__ import annotations

import ipaddress
import subprocess
import sys

import pytest

from meshproxy import iptables
from meshproxy.cliargs import Parser
from meshproxy.iptables import IPV4, IPV6, Capture, apply_input, chain_rules, cleanup_input

OUT = "-A MESHPROXY_OUTPUT"


def nets(*cidrs: str):
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def index(rules: list[str], rule: str) -> int:
    assert rule in rules, f"{rule!r} not in {rules}"
    return rules.index(rule)


def test_default_outbound_rules_in_istio_order():
    rules = chain_rules(Capture(), IPV4)
    order = [
        f"{OUT} -s 127.0.0.6/32 -o lo -j RETURN",
        f"{OUT} ! -d 127.0.0.1/32 -o lo -m owner --uid-owner 1337 -j MESHPROXY_IN_REDIRECT",
        f"{OUT} ! -d 127.0.0.1/32 -o lo -m owner --gid-owner 1337 -j MESHPROXY_IN_REDIRECT",
        f"{OUT} -o lo -j RETURN",
        f"{OUT} -m owner --uid-owner 1337 -j RETURN",
        f"{OUT} -m owner --gid-owner 1337 -j RETURN",
        f"{OUT} -j MESHPROXY_REDIRECT",
    ]
    assert [index(rules, rule) for rule in order] == sorted(index(rules, rule) for rule in order)
    assert [r for r in rules if r.startswith(OUT)] == order
    assert "-A MESHPROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules
    assert "-A MESHPROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006" in rules


def test_default_inbound_captures_all_but_the_proxys_ports():
    rules = [r for r in chain_rules(Capture(), IPV4) if r.startswith("-A MESHPROXY_INBOUND")]
    assert rules == [
        *(f"-A MESHPROXY_INBOUND -p tcp -m tcp --dport {p} -j RETURN" for p in (15090, 15021, 15020, 15001, 15006)),
        "-A MESHPROXY_INBOUND -p tcp -j MESHPROXY_IN_REDIRECT",
    ]


def test_included_inbound_ports_minus_the_excluded_and_the_proxys():
    capture = Capture(include_inbound_ports=(8080, 15021, 9000, 15006, 7000), exclude_inbound_ports=(9000,))
    rules = [r for r in chain_rules(capture, IPV4) if r.startswith("-A MESHPROXY_INBOUND")]
    assert rules == [
        "-A MESHPROXY_INBOUND -p tcp -m tcp --dport 8080 -j MESHPROXY_IN_REDIRECT",
        "-A MESHPROXY_INBOUND -p tcp -m tcp --dport 7000 -j MESHPROXY_IN_REDIRECT",
    ]
    assert not [r for r in chain_rules(Capture(include_inbound_ports=()), IPV4) if "-A MESHPROXY_INBOUND" in r]


def test_custom_ports_and_owners():
    capture = Capture(proxy_uid=2000, proxy_gid=2001, outbound_port=16001, inbound_port=16006)
    rules = chain_rules(capture, IPV4)
    assert "-A MESHPROXY_REDIRECT -p tcp -j REDIRECT --to-ports 16001" in rules
    assert "-A MESHPROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006" in rules
    assert f"{OUT} -m owner --uid-owner 2000 -j RETURN" in rules
    assert f"{OUT} -m owner --gid-owner 2001 -j RETURN" in rules
    assert "-A MESHPROXY_INBOUND -p tcp -m tcp --dport 16006 -j RETURN" in rules
    assert "1337" not in "\n".join(rules)


def test_excluded_ports_and_cidrs_come_before_the_redirect_and_split_by_family():
    capture = Capture(
        exclude_outbound_ports=(5432,),
        exclude_outbound_cidrs=nets("10.0.0.0/8", "fd00::/8"),
        include_outbound_cidrs=nets("10.96.0.0/12", "fd96::/108"),
    )
    v4, v6 = chain_rules(capture, IPV4), chain_rules(capture, IPV6)
    tail4 = [r for r in v4 if r.startswith(OUT)][-3:]
    assert tail4 == [
        f"{OUT} -p tcp -m tcp --dport 5432 -j RETURN",
        f"{OUT} -d 10.0.0.0/8 -j RETURN",
        f"{OUT} -d 10.96.0.0/12 -j MESHPROXY_REDIRECT",
    ]
    tail6 = [r for r in v6 if r.startswith(OUT)][-3:]
    assert tail6 == [
        f"{OUT} -p tcp -m tcp --dport 5432 -j RETURN",
        f"{OUT} -d fd00::/8 -j RETURN",
        f"{OUT} -d fd96::/108 -j MESHPROXY_REDIRECT",
    ]
    assert f"{OUT} -s ::6/128 -o lo -j RETURN" in v6
    assert f"{OUT} ! -d ::1/128 -o lo -m owner --uid-owner 1337 -j MESHPROXY_IN_REDIRECT" in v6


def test_an_include_list_without_a_family_captures_none_of_it():
    v6 = chain_rules(Capture(include_outbound_cidrs=nets("10.96.0.0/12")), IPV6)
    assert not [r for r in v6 if "MESHPROXY_REDIRECT" in r and r.startswith(OUT)]
    assert not [r for r in chain_rules(Capture(include_outbound_cidrs=()), IPV4) if r.endswith("-j MESHPROXY_REDIRECT")]


SAVE_HEAD = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
OURS = "".join(f":{chain} - [0:0]\n" for chain in iptables.CHAINS)


def transaction(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[0] == "*nat" and lines[-1] == "COMMIT"
    return lines[1:-1]


def test_first_apply_declares_the_chains_and_inserts_the_jumps():
    lines = transaction(apply_input(Capture(), IPV4, ""))
    assert lines[:4] == [
        ":MESHPROXY_OUTPUT - [0:0]",
        ":MESHPROXY_REDIRECT - [0:0]",
        ":MESHPROXY_INBOUND - [0:0]",
        ":MESHPROXY_IN_REDIRECT - [0:0]",
    ]
    assert lines[4:-2] == chain_rules(Capture(), IPV4)
    assert lines[-2:] == ["-I PREROUTING 1 -p tcp -j MESHPROXY_INBOUND", "-I OUTPUT 1 -p tcp -j MESHPROXY_OUTPUT"]


def test_reapply_keeps_present_jumps_and_drops_duplicates_and_stale_ones():
    installed = (
        SAVE_HEAD
        + OURS
        + (
            "-A PREROUTING -p tcp -j MESHPROXY_INBOUND\n"
            "-A OUTPUT -p tcp -j MESHPROXY_OUTPUT\n"
            "-A OUTPUT -p tcp -j MESHPROXY_OUTPUT\n"
            "-A OUTPUT -j MESHPROXY_REDIRECT\n"
            "-A OUTPUT -p udp -j RETURN\n"
            "-A MESHPROXY_OUTPUT -j MESHPROXY_REDIRECT\n"
            "COMMIT\n"
        )
    )
    lines = transaction(apply_input(Capture(), IPV4, installed))
    changes = [line for line in lines if line.startswith(("-D", "-I"))]
    assert changes == ["-D OUTPUT -p tcp -j MESHPROXY_OUTPUT", "-D OUTPUT -j MESHPROXY_REDIRECT"]


def test_other_tables_do_not_count():
    save = "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j MESHPROXY_OUTPUT\nCOMMIT\n" + SAVE_HEAD + "COMMIT\n"
    assert transaction(apply_input(Capture(), IPV4, save))[-2:] == [
        "-I PREROUTING 1 -p tcp -j MESHPROXY_INBOUND",
        "-I OUTPUT 1 -p tcp -j MESHPROXY_OUTPUT",
    ]
    assert cleanup_input(save) is None


def test_cleanup_with_nothing_installed_is_nothing():
    assert cleanup_input("") is None
    assert cleanup_input(SAVE_HEAD + "-A OUTPUT -p udp -j RETURN\nCOMMIT\n") is None


def test_cleanup_flushes_unhooks_and_deletes_only_ours():
    installed = SAVE_HEAD + (
        ":MESHPROXY_OUTPUT - [0:0]\n:MESHPROXY_REDIRECT - [0:0]\n:OTHER - [0:0]\n"
        "-A OUTPUT -p tcp -j MESHPROXY_OUTPUT\n-A OUTPUT -p udp -j OTHER\n"
        "-A MESHPROXY_OUTPUT -j MESHPROXY_REDIRECT\nCOMMIT\n"
    )
    assert transaction(cleanup_input(installed)) == [
        ":MESHPROXY_OUTPUT - [0:0]",
        ":MESHPROXY_REDIRECT - [0:0]",
        "-D OUTPUT -p tcp -j MESHPROXY_OUTPUT",
        "-X MESHPROXY_OUTPUT",
        "-X MESHPROXY_REDIRECT",
    ]


# ---- the command line ----


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--exclude-outbound-ports", "0"], "port 0 is not in 1-65535"),
        (["--exclude-inbound-ports", "80,70000"], "port 70000 is not in 1-65535"),
        (["--outbound-port", "http"], "'http' is not a port number"),
        (["--include-inbound-ports", "80,,81"], "has an empty item"),
        (["--exclude-outbound-cidrs", "10.0.0.0/33"], "'10.0.0.0/33' is not an IP address or CIDR"),
        (["--include-outbound-cidrs", "not-a-cidr"], "'not-a-cidr' is not an IP address or CIDR"),
        (["--exclude-outbound-cidrs", "*"], "'*' is not an IP address or CIDR"),
        (["--proxy-uid", "-1"], "'-1' is not a valid uid/gid"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(args, complaint):
    done = subprocess.run(
        [sys.executable, "-m", "meshproxy.iptables", *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("meshproxy iptables: error: "), done.stderr
    assert complaint in lines[0]


def test_arguments_parse_into_a_capture():
    parser = Parser(prog="meshproxy")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    iptables.add_parser(sub)
    args = parser.parse_args(
        [
            "iptables",
            "--proxy-uid", "2000",
            "--include-outbound-cidrs", "10.96.0.5/12, fd96::/108",
            "--exclude-outbound-ports", "5432,5432,3306",
            "--include-inbound-ports", "*",
            "--exclude-inbound-ports", "",
        ]
    )  # fmt: skip
    assert args.command == "iptables"
    capture = Capture.from_args(args)
    assert capture == Capture(
        proxy_uid=2000,
        include_outbound_cidrs=nets("10.96.0.0/12", "fd96::/108"),
        exclude_outbound_ports=(5432, 3306),
        include_inbound_ports=None,
        exclude_inbound_ports=(),
    )


def test_without_iptables_it_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert iptables.main([]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0] == (
        "meshproxy iptables: iptables-save and iptables-restore not found (is iptables installed, with NET_ADMIN?)"
    )


def test_dry_run_without_iptables_prints_the_transaction_for_an_empty_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert iptables.main(["--dry-run", "--exclude-outbound-ports", "5432"]) == 0
    out, err = capsys.readouterr()
    assert out == "# iptables-restore --noflush\n" + apply_input(Capture(exclude_outbound_ports=(5432,)), IPV4, "")
    assert "IPv6 is left alone" in err
