"""The node's resolvers as the engine reads them, and the DNS openings the rules make for them.
The traffic itself is proved in test_isolation.py, through real resolvers."""

from __future__ import annotations

from utopia_agent.network.firewall import IsolationRules
from utopia_agent.network.resolvers import ENGINE_FALLBACK, engine_resolvers, nameservers


def resolvers_of(tmp_path, text: str, upstream: str | None = None) -> tuple[str, ...]:
    (tmp_path / "resolv.conf").write_text(text)
    if upstream is not None:
        (tmp_path / "upstream.conf").write_text(upstream)
    return engine_resolvers(tmp_path / "resolv.conf", tmp_path / "upstream.conf")


def test_nameserver_lines_are_read_in_order_and_junk_is_left_out():
    text = "# nameserver 10.9.9.9\nsearch example.internal\nnameserver 169.254.169.254 # GCE\nnameserver  198.18.5.1\n" \
           "nameserver not-an-address\nnameserver fe80::1%eth0\noptions ndots:2\n"
    assert nameservers(text) == ["169.254.169.254", "198.18.5.1", "fe80::1"]


def test_the_engine_view_drops_loopback_and_ipv6_and_keeps_the_order(tmp_path):
    assert resolvers_of(tmp_path, "nameserver 127.0.0.1\nnameserver 198.18.5.1\nnameserver 2001:db8::53\nnameserver 169.254.169.254\n") \
        == ("198.18.5.1", "169.254.169.254")


def test_systemd_resolved_stub_means_its_upstream_file(tmp_path):
    assert resolvers_of(tmp_path, "nameserver 127.0.0.53\noptions edns0\n", upstream="nameserver 168.63.129.16\n") == ("168.63.129.16",)


def test_no_reachable_resolver_means_the_engines_fallback(tmp_path):
    assert resolvers_of(tmp_path, "nameserver 127.0.0.1\n") == ENGINE_FALLBACK
    assert resolvers_of(tmp_path, "nameserver 127.0.0.53\n") == ENGINE_FALLBACK, "resolved's upstream file is missing"
    assert engine_resolvers(tmp_path / "missing", tmp_path / "missing-too") == ENGINE_FALLBACK


def test_dns_to_each_resolver_returns_before_any_drop_and_nothing_else_does():
    rules = IsolationRules("utc-1", "UTOPIA-IN-1", "UTOPIA-FWD-1", ("168.63.129.16/32",), ("169.254.169.254", "198.18.5.1"))
    chains = rules.chain_rules()
    for chain in chains.values():
        first_drop = next(i for i, rule in enumerate(chain) if rule[-1] == "DROP")
        openings = [rule for rule in chain if rule[-1] == "RETURN" and "--dport" in rule]
        assert len(openings) == 4 and all(chain.index(rule) < first_drop for rule in openings)
        assert {(rule[1], rule[3], rule[7]) for rule in openings} == {
            (f"{address}/32", protocol, "53") for address in ("169.254.169.254", "198.18.5.1") for protocol in ("udp", "tcp")}
    forward = chains["UTOPIA-FWD-1"]
    assert ["-m", "conntrack", "--ctorigdst", "168.63.129.16", "-j", "DROP"] in forward, "as iptables -S prints a /32 back"
    assert ["-d", "168.63.129.16/32", "-j", "DROP"] in forward
