"""Configuration checks that need no agent: each bad variable, the read timeout and the host port range.

gunicorn.conf.py runs the same checks in the master and turns a ConfigError into one line and
exit code 2; tests/test_startup.py proves that exit once under a real gunicorn.
"""

from __future__ import annotations

import os

import pytest

from utopia_agent.claims.resources import NodeResources
from utopia_agent.config import ConfigError, load_config, prepare_state_dir


@pytest.fixture
def ephemeral(tmp_path):
    """Writes a stand-in for /proc/sys/net/ipv4/ip_local_port_range and returns its path."""

    def write(low: int, high: int):
        path = tmp_path / "ip_local_port_range"
        path.write_text(f"{low}\t{high}\n")
        return path

    return write


@pytest.mark.parametrize(
    "env,variable",
    [
        ({}, "UTOPIA_AGENT_TOKEN"),
        ({"UTOPIA_AGENT_TOKEN_FILE": "/nonexistent/token"}, "UTOPIA_AGENT_TOKEN_FILE"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_HOST_PORT_RANGE": "40000-30000"}, "UTOPIA_AGENT_HOST_PORT_RANGE"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_HOST_PORT_RANGE": "lots"}, "UTOPIA_AGENT_HOST_PORT_RANGE"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_GPU_BACKEND": "cuda"}, "UTOPIA_AGENT_GPU_BACKEND"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_WORKERS": "many"}, "UTOPIA_AGENT_WORKERS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": "/proc/utopia"}, "UTOPIA_AGENT_STATE_DIR"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": "relative/state"}, "UTOPIA_AGENT_STATE_DIR"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_PULL_IDLE_TIMEOUT": "0"}, "UTOPIA_AGENT_PULL_IDLE_TIMEOUT"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_VOLUME_ROOTS": "/"}, "UTOPIA_AGENT_VOLUME_ROOTS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_NETWORK_ISOLATION": "maybe"}, "UTOPIA_AGENT_NETWORK_ISOLATION"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_NETWORK_SUBNET": "10.1.0.0/33"}, "UTOPIA_AGENT_NETWORK_SUBNET"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_NETWORK_SUBNET": "fd00::/64"}, "UTOPIA_AGENT_NETWORK_SUBNET"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_NETWORK_SUBNET": "10.1.0.0/30"}, "UTOPIA_AGENT_NETWORK_SUBNET"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_BLOCKED_NETWORKS": "10.0.0.0/8,management"}, "UTOPIA_AGENT_BLOCKED_NETWORKS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_READ_TIMEOUT": "soon"}, "UTOPIA_AGENT_READ_TIMEOUT"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_RESERVED_CPUS": str(len(os.sched_getaffinity(0)))}, "UTOPIA_AGENT_RESERVED_CPUS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_RESERVED_CPUS": "-1"}, "UTOPIA_AGENT_RESERVED_CPUS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_RESERVED_MEMORY_MB": "1e12"}, "UTOPIA_AGENT_RESERVED_MEMORY_MB"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_CPU_PINNING": "always"}, "UTOPIA_AGENT_CPU_PINNING"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_DEFAULT_CPUS": "0"}, "UTOPIA_AGENT_DEFAULT_CPUS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_DEFAULT_CPUS": str(len(os.sched_getaffinity(0)) + 1)}, "UTOPIA_AGENT_DEFAULT_CPUS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_DEFAULT_MEMORY_MB": "8"}, "UTOPIA_AGENT_DEFAULT_MEMORY_MB"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_DEFAULT_MEMORY_MB": "lots"}, "UTOPIA_AGENT_DEFAULT_MEMORY_MB"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_UNBLOCKED_NETWORKS": "10.0.0.0/8"}, "UTOPIA_AGENT_UNBLOCKED_NETWORKS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_LOG_FOLLOW_SECONDS": "forever"}, "UTOPIA_AGENT_LOG_FOLLOW_SECONDS"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT": "101"}, "UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT": "0"}, "UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT": "70", "UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT": "70"},
         "UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT": "-1"}, "UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_IMAGE_GC_MIN_AGE": "-5"}, "UTOPIA_AGENT_IMAGE_GC_MIN_AGE"),
        ({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_IMAGE_GC_INTERVAL": "0"}, "UTOPIA_AGENT_IMAGE_GC_INTERVAL"),
    ],
)
def test_a_bad_variable_is_refused_by_name_in_one_line_and_nothing_else_is_said(env, variable, tmp_path, capsys, caplog):
    """The checks the agent's master runs before any worker starts, in its order (a ConfigError ends them)."""
    with pytest.raises(ConfigError) as refused:
        prepare_state_dir(load_config({"UTOPIA_AGENT_STATE_DIR": str(tmp_path / "state"), **env}))
    assert refused.value.variable == variable
    assert str(refused.value).startswith(variable + ": ") and "\n" not in str(refused.value)
    assert capsys.readouterr() == ("", "") and caplog.records == [], "the agent's one line is the error's"


def config(ephemeral_ports_path, **env: str):
    return load_config({"UTOPIA_AGENT_TOKEN": "t", **env}, ephemeral_ports_path=ephemeral_ports_path)


def test_image_collection_defaults_and_marks(ephemeral):
    default = config(ephemeral(32768, 60999))
    assert (default.image_gc_high_percent, default.image_gc_low_percent, default.image_gc_min_age, default.image_gc_interval) == (85, 80, 120.0, 60.0)
    low = config(ephemeral(32768, 60999), UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT="50", UTOPIA_AGENT_IMAGE_GC_MIN_AGE="0")
    assert (low.image_gc_high_percent, low.image_gc_low_percent, low.image_gc_min_age) == (50, 49, 0.0), "LOW follows a HIGH set under 80"


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


def test_network_variables_are_read_as_networks(tmp_path):
    config = load_config({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path),
                          "UTOPIA_AGENT_NETWORK_SUBNET": "10.77.0.0/24", "UTOPIA_AGENT_BLOCKED_NETWORKS": " 10.1.2.3/8, 192.0.2.7,10.0.0.0/8"})
    assert config.network_isolation and config.network_subnet == "10.77.0.0/24"
    assert config.blocked_networks == ("100.100.100.200/32", "168.63.129.16/32", "10.0.0.0/8", "192.0.2.7/32"), \
        "the clouds' endpoints first, then the operator's"
    off = load_config({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path), "UTOPIA_AGENT_NETWORK_ISOLATION": "off"})
    assert not off.network_isolation and off.network_subnet is None


def test_a_default_blocked_network_is_taken_away_only_by_name(tmp_path):
    config = load_config({"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path),
                          "UTOPIA_AGENT_UNBLOCKED_NETWORKS": "168.63.129.16", "UTOPIA_AGENT_BLOCKED_NETWORKS": "198.18.9.0/24"})
    assert config.blocked_networks == ("100.100.100.200/32", "198.18.9.0/24")


def test_claims_without_gpus_get_bounded_defaults(tmp_path):
    base = {"UTOPIA_AGENT_TOKEN": "t", "UTOPIA_AGENT_STATE_DIR": str(tmp_path)}
    node = NodeResources.read()
    capacity_cpus, capacity_memory_mb = node.capacity(load_config(base).reserved_cpus, load_config(base).reserved_memory_mb)
    defaults = load_config(base)
    assert 0 < defaults.default_cpus <= min(1.0, capacity_cpus)
    assert 16 <= defaults.default_memory_mb <= min(2048, capacity_memory_mb)
    chosen = load_config({**base, "UTOPIA_AGENT_DEFAULT_CPUS": "0.05", "UTOPIA_AGENT_DEFAULT_MEMORY_MB": "64"})
    assert (chosen.default_cpus, chosen.default_memory_mb) == (0.05, 64)
