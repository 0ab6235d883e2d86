"""Configuration checks that need no agent: the read timeout and the host port range."""

from __future__ import annotations

import pytest

from utopia_agent.config import ConfigError, load_config


@pytest.fixture
def ephemeral(tmp_path):
    """Writes a stand-in for /proc/sys/net/ipv4/ip_local_port_range and returns its path."""

    def write(low: int, high: int):
        path = tmp_path / "ip_local_port_range"
        path.write_text(f"{low}\t{high}\n")
        return path

    return write


def config(ephemeral_ports_path, **env: str):
    return load_config({"UTOPIA_AGENT_TOKEN": "t", **env}, ephemeral_ports_path=ephemeral_ports_path)


def test_read_timeout_defaults_to_10_seconds_and_takes_fractions(ephemeral):
    assert config(ephemeral(32768, 60999)).read_timeout == 10.0
    assert config(ephemeral(32768, 60999), UTOPIA_AGENT_READ_TIMEOUT="2.5").read_timeout == 2.5


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_bad_read_timeout_is_refused_by_name(ephemeral, value):
    with pytest.raises(ConfigError) as refused:
        config(ephemeral(32768, 60999), UTOPIA_AGENT_READ_TIMEOUT=value)
    assert refused.value.variable == "UTOPIA_AGENT_READ_TIMEOUT"
    assert str(refused.value).startswith("UTOPIA_AGENT_READ_TIMEOUT: ")


def test_the_default_host_port_range_lies_below_the_usual_ephemeral_range(ephemeral):
    assert config(ephemeral(32768, 60999)).host_port_range == (20000, 29999)


@pytest.mark.parametrize("value,expected", [("1024-32767", (1024, 32767)), ("61000-65535", (61000, 65535)), ("25000-25000", (25000, 25000))])
def test_a_host_port_range_beside_the_ephemeral_range_is_taken(ephemeral, value, expected):
    assert config(ephemeral(32768, 60999), UTOPIA_AGENT_HOST_PORT_RANGE=value).host_port_range == expected


@pytest.mark.parametrize("value", ["30000-40000", "32768-32768", "60999-65535", "1024-65535", "40000-41000"])
def test_a_host_port_range_overlapping_the_ephemeral_range_is_refused_naming_both(ephemeral, value):
    with pytest.raises(ConfigError) as refused:
        config(ephemeral(32768, 60999), UTOPIA_AGENT_HOST_PORT_RANGE=value)
    message = str(refused.value)
    assert message.startswith(f"UTOPIA_AGENT_HOST_PORT_RANGE: {value} overlaps the kernel's ephemeral port range 32768-60999")
    assert "\n" not in message


def test_a_default_range_overlapping_this_kernels_ephemeral_range_is_refused(ephemeral):
    with pytest.raises(ConfigError) as refused:
        config(ephemeral(10000, 60999))
    assert str(refused.value).startswith(
        "UTOPIA_AGENT_HOST_PORT_RANGE: the default 20000-29999 overlaps the kernel's ephemeral port range 10000-60999"
    )


def test_without_the_kernels_range_any_valid_range_is_taken(tmp_path):
    assert config(tmp_path / "missing", UTOPIA_AGENT_HOST_PORT_RANGE="1024-65535").host_port_range == (1024, 65535)
