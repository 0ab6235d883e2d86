"""Configuration from the environment: read once, checked once, refused with one clear line."""

from __future__ import annotations

import ipaddress
import math
import hmac
import os
import socket
import ssl
import sys
import time
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import TypeVar

from .claims.resources import CPU_STEP, MIN_MEMORY_MB, PINNING_MODES, NodeResources

LOG_FORMATS = ("json", "text")
PROMETHEUS_AUTH_MODES = ("token", "none")
RESTART_POLICIES = ("no", "on-failure", "unless-stopped", "always")
GPU_BACKENDS = ("auto", "nvml", "fake", "none")
# Exec sessions (one-shot and interactive) the whole agent runs at once; each holds a thread of
# its own beyond the request pool (gunicorn.conf.py), so /health never waits behind them.
MAX_EXEC_SESSIONS = 16
CLAIM_VOLUME_BACKENDS = ("auto", "loop", "btrfs")
DISK_QUOTA_MODES = ("auto", "engine", "measured", "off")
# A claim without GPUs and without `disk_gb` (a sidecar, a CPU job): room for a pip install and logs.
DEFAULT_DISK_GB = 10.0
# Host paths no volume root may be, contain or lie in: the host's system, the engine's and
# other orchestrators' state. The agent's own code, token and state are added at load.
SYSTEM_PATHS = (
    "/proc", "/sys", "/dev", "/etc", "/boot", "/root", "/usr", "/bin", "/sbin", "/lib", "/lib64",
    "/run", "/var/run", "/var/lib/docker", "/var/lib/containerd", "/var/lib/kubelet", "/var/lib/utopia-agent",
)
# Below Linux's default ephemeral range (32768-60999), from which the kernel picks the local
# port of every outgoing connection: a host port in there may be taken by chance at any time.
DEFAULT_HOST_PORT_RANGE = (20000, 29999)
# Cloud metadata and host-agent endpoints outside 169.254.0.0/16 (which the firewall always blocks:
# AWS, GCP, Azure IMDS, Oracle, Huawei, DigitalOcean at 169.254.169.254, Tencent at 169.254.0.23).
# Blocked by default; UTOPIA_AGENT_UNBLOCKED_NETWORKS takes one away. Sources in docs/configuration.md.
CLOUD_METADATA_NETWORKS = (
    "100.100.100.200/32",  # Alibaba Cloud ECS metadata (hands out the instance's RAM role STS token)
    "168.63.129.16/32",    # Azure WireServer (host agent, and Azure's DNS: port 53 stays open to it as a resolver)
)
# A claim's default share of the claims' capacity where the node is too small for the defaults.
DEFAULT_CLAIM_CPUS, DEFAULT_CLAIM_MEMORY_MB, SMALL_NODE_DEFAULT_FRACTION = 1.0, 2048, 0.25
EPHEMERAL_PORTS_PATH = Path("/proc/sys/net/ipv4/ip_local_port_range")


class ConfigError(Exception):
    """A configuration variable is missing or wrong; the message names it."""

    def __init__(self, variable: str, problem: str):
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


# Where the certificate files' problems are told: each to the variable that names the file.
CERT_VARIABLE, KEY_VARIABLE, CLIENT_CA_VARIABLE = (
    "UTOPIA_AGENT_TLS_CERT_FILE", "UTOPIA_AGENT_TLS_KEY_FILE", "UTOPIA_AGENT_TLS_CLIENT_CA_FILE",
)
# Forward-secret AEAD suites only for TLS 1.2 (TLS 1.3 has its own, all sane).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True)
class CertificateFacts:
    """What an operator checks of a certificate: who it names and until when it holds."""

    subject: str
    names: tuple[str, ...]
    not_after: float  # Unix seconds

    def days_left(self, now: float | None = None) -> float:
        return (self.not_after - (time.time() if now is None else now)) / 86400


@dataclass(frozen=True)
class TlsFiles:
    """The files the agent serves HTTPS with; read again on SIGHUP (server/tls_reload.py)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def server_context(self) -> ssl.SSLContext:
        """A server context from the files as they are now; ConfigError naming the variable of the bad file."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(TLS12_CIPHERS)
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        context.set_alpn_protocols(["http/1.1"])  # the worker reads HTTP/1.1 only: a client offering h2 falls back
        facts = certificate_facts(self.cert_file, CERT_VARIABLE)
        if facts.not_after <= time.time():
            raise ConfigError(CERT_VARIABLE, f"the certificate in {self.cert_file} expired at {utc_text(facts.not_after)}")
        if not os.access(self.key_file, os.R_OK):
            raise ConfigError(KEY_VARIABLE, f"cannot read {self.key_file}")
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(KEY_VARIABLE, f"cannot load {self.key_file} as the key of the certificate in {self.cert_file}: {_reason(exc)}") from None
        if self.client_ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(CLIENT_CA_VARIABLE, f"cannot load CA certificates from {self.client_ca_file}: {_reason(exc)}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def certificate_facts(path: Path, variable: str) -> CertificateFacts:
    """Subject (RFC 4514), DNS/IP names and expiry of the first certificate of a PEM file; ConfigError naming `variable`."""
    # Imported here, where a certificate is read (start, `check`, SIGHUP): a plain-HTTP worker never loads it.
    from cryptography import x509

    try:
        pem = path.read_bytes()
    except OSError:
        raise ConfigError(variable, f"cannot read {path}") from None
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(variable, f"{path} holds no PEM certificate ({exc})") from None
    try:
        alternative = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names: tuple[str, ...] = ()
    else:
        kinds = ((x509.DNSName, "DNS"), (x509.IPAddress, "IP Address"), (x509.UniformResourceIdentifier, "URI"), (x509.RFC822Name, "email"))
        names = tuple(f"{label}:{value}" for kind, label in kinds for value in alternative.get_values_for_type(kind))
    return CertificateFacts(certificate.subject.rfc4514_string(), names, certificate.not_valid_after_utc.timestamp())


def _reason(exc: OSError) -> str:
    return getattr(exc, "reason", None) or exc.strerror or str(exc)


def utc_text(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


@dataclass(frozen=True)
class Config:
    """Everything the agent is told by its operator, never by a caller."""

    token: str
    # A second token that may only read (GET); None: there is none.
    read_token: str | None = None
    # None: plain HTTP.
    tls: TlsFiles | None = None
    bind: str = "0.0.0.0:8600"
    workers: int = 4
    node_id: str = field(default_factory=socket.gethostname)
    state_dir: Path = Path("/var/lib/utopia-agent")
    gpu_backend: str = "auto"
    fake_gpu_count: int = 8
    volume_roots: tuple[Path, ...] = ()
    host_port_range: tuple[int, int] = DEFAULT_HOST_PORT_RANGE
    pull_timeout: float = 1800.0
    pull_idle_timeout: float = 120.0
    engine_timeout: float = 10.0
    read_timeout: float = 10.0
    stop_timeout: int = 5
    prometheus_auth: str = "token"
    log_format: str = "json"
    max_body_bytes: int = 64 * 1024
    pids_limit: int = 4096
    log_max_size: str = "50m"
    log_max_files: int = 3
    restart_policy: str = "unless-stopped"
    unstarted_seconds: float = 60.0
    reserved_cpus: float = 1.0
    reserved_memory_mb: int = 2048
    cpu_pinning: str = "numa"
    log_follow_seconds: float = 300.0
    infiniband_dir: Path = Path("/dev/infiniband")
    gpu_release_seconds: float = 60.0
    nvml_timeout: float = 5.0
    network_isolation: bool = True
    network_subnet: str | None = None
    blocked_networks: tuple[str, ...] = CLOUD_METADATA_NETWORKS
    default_cpus: float = DEFAULT_CLAIM_CPUS
    default_memory_mb: int = DEFAULT_CLAIM_MEMORY_MB
    image_gc_high_percent: int = 85
    image_gc_low_percent: int = 80
    image_gc_min_age: float = 120.0
    image_gc_interval: float = 60.0
    disk_pressure_percent: int = 10
    events_history: int = 10000
    events_heartbeat_seconds: float = 15.0
    exec_idle_seconds: float = 600.0
    exec_output_bytes: int = 1024 * 1024
    exec_sessions_per_claim: int = 8
    disk_quota: str = "auto"
    default_disk_gb: float = DEFAULT_DISK_GB
    # None: 15% of the engine's data-root filesystem (claims/disks.default_reserved_gb), known only once the engine says where that is.
    reserved_disk_gb: float | None = None
    # Resolved at load: what no volume may reach (SYSTEM_PATHS, the agent's code and token).
    denied_paths: tuple[str, ...] = ()
    # Where claim volumes live (None: STATE_DIR/claim-volumes) and how they get their size.
    claim_volumes_dir: Path | None = None
    claim_volume_backend: str = "auto"

    @property
    def effective_volume_roots(self) -> tuple[Path, ...]:
        return self.volume_roots or (self.state_dir / "volumes",)

    @property
    def mounts_dir(self) -> Path:
        return self.state_dir / "mounts"

    @property
    def claim_volumes_root(self) -> Path:
        return self.claim_volumes_dir or self.state_dir / "claim-volumes"


Number = TypeVar("Number", int, float)


def _number(env: Mapping[str, str], name: str, convert: Callable[[str], Number], kind: str) -> Number | None:
    """The variable converted, None when unset or empty; one clear line when it is not `kind`."""
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return convert(raw)
    except ValueError:
        raise ConfigError(name, f"expected {kind}, got {raw!r}") from None


def _int(env: Mapping[str, str], name: str, default: int, low: int = 1, high: int | None = None) -> int:
    value = _number(env, name, int, "an integer")
    if value is None:
        return default
    if value < low or (high is not None and value > high):
        upper = f"..{high}" if high is not None else " or more"
        raise ConfigError(name, f"expected {low}{upper}, got {value}")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float, zero: bool = False) -> float:
    value = _number(env, name, float, "a number of seconds")
    if value is None:
        return default
    if not (value >= 0 if zero else value > 0):
        raise ConfigError(name, f"expected a {'non-negative' if zero else 'positive'} number of seconds, got {env[name]!r}")
    return value


def _reserve(env: Mapping[str, str], name: str, default: float, node_total: float, unit: str) -> float:
    """A number of CPUs or MB kept for the system: at least 0, and less than the node has. Unset,
    it is `default`, or half the node on a node too small for that (a laptop)."""
    value = _number(env, name, float, "a number")
    if value is None:
        return min(default, node_total / 2)
    if not 0 <= value < float("inf"):
        raise ConfigError(name, f"expected 0 or more, got {env[name]!r}")
    if value >= node_total:
        raise ConfigError(name, f"{value:g} leaves nothing of the node's {node_total:g} {unit} for claims")
    return value


def _gb(env: Mapping[str, str], name: str, default: float | None, zero: bool) -> float | None:
    """A size in GB (2^30 bytes): more than 0, or at least 0 with `zero`."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number of GB, got {raw!r}") from None
    if not (0 <= value < float("inf") if zero else 0 < value < float("inf")):
        raise ConfigError(name, f"expected {'0 or more' if zero else 'more than 0'} GB, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or default
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _port_range(env: Mapping[str, str], name: str, ephemeral: tuple[int, int] | None) -> tuple[int, int]:
    raw = env.get(name)
    if not raw:
        bounds, described = DEFAULT_HOST_PORT_RANGE, "the default {}-{}".format(*DEFAULT_HOST_PORT_RANGE)
    else:
        low, sep, high = raw.partition("-")
        try:
            bounds = (int(low), int(high))
        except ValueError:
            raise ConfigError(name, f"expected LOW-HIGH, got {raw!r}") from None
        if not sep or not 1 <= bounds[0] <= bounds[1] <= 65535:
            raise ConfigError(name, f"expected LOW-HIGH within 1-65535, got {raw!r}")
        described = raw
    if ephemeral and bounds[0] <= ephemeral[1] and ephemeral[0] <= bounds[1]:
        raise ConfigError(
            name,
            f"{described} overlaps the kernel's ephemeral port range {ephemeral[0]}-{ephemeral[1]} "
            "(net.ipv4.ip_local_port_range), from which outgoing connections take their ports; choose a range outside it",
        )
    return bounds


def ephemeral_port_range(path: Path = EPHEMERAL_PORTS_PATH) -> tuple[int, int] | None:
    """The ports the kernel gives outgoing connections (net.ipv4.ip_local_port_range); None where it cannot be read."""
    try:
        low, high = path.read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return None


def _token(env: Mapping[str, str], name: str = "UTOPIA_AGENT_TOKEN") -> str:
    """The token in `name`, else in the file `name`_FILE names; "" when neither is set."""
    token = env.get(name, "")
    token_file = env.get(f"{name}_FILE", "")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{name}_FILE", f"cannot read {token_file}: {exc.strerror}") from None
    if any(ch.isspace() or not ch.isprintable() for ch in token):
        raise ConfigError(name, "the token must be printable with no whitespace")
    return token


def _tokens(env: Mapping[str, str]) -> tuple[str, str | None]:
    """The full token (required) and the read-only one (optional, and never the same)."""
    token = _token(env)
    if not token:
        raise ConfigError("UTOPIA_AGENT_TOKEN", "no token set (or UTOPIA_AGENT_TOKEN_FILE); refusing to start")
    read_token = _token(env, "UTOPIA_AGENT_READ_TOKEN") or None
    if read_token is not None and hmac.compare_digest(read_token.encode(), token.encode()):
        raise ConfigError("UTOPIA_AGENT_READ_TOKEN", "the read-only token must differ from UTOPIA_AGENT_TOKEN")
    return token, read_token


def _tls(env: Mapping[str, str]) -> TlsFiles | None:
    """Both files or neither. The files are loaded by whoever serves them (TlsFiles.server_context):
    the master at start, so a bad pair stops the agent there, and again on SIGHUP; never by a
    worker's app, which a pair broken since start must not keep from (re)starting."""
    cert, key, client_ca = (env.get(name) or None for name in (CERT_VARIABLE, KEY_VARIABLE, CLIENT_CA_VARIABLE))
    if cert is None and key is None:
        if client_ca is not None:
            raise ConfigError(CLIENT_CA_VARIABLE, f"client certificates need HTTPS: set {CERT_VARIABLE} and {KEY_VARIABLE} too")
        return None
    if cert is None or key is None:
        missing, present = (CERT_VARIABLE, KEY_VARIABLE) if cert is None else (KEY_VARIABLE, CERT_VARIABLE)
        raise ConfigError(missing, f"not set, but {present} is: HTTPS needs both the certificate and its key")
    return TlsFiles(Path(cert), Path(key), Path(client_ca) if client_ca else None)


def _ipv4_network(name: str, raw: str) -> str:
    try:
        network = ipaddress.ip_network(raw.strip(), strict=False)
    except ValueError:
        raise ConfigError(name, f"expected an IPv4 network such as 10.20.0.0/16, got {raw.strip()!r}") from None
    if network.version != 4:
        raise ConfigError(name, f"{raw.strip()} is not IPv4 (the claims' network and rules are IPv4)")
    return str(network)


def _network_subnet(env: Mapping[str, str]) -> str | None:
    raw = env.get("UTOPIA_AGENT_NETWORK_SUBNET", "").strip()
    if not raw:
        return None
    subnet = _ipv4_network("UTOPIA_AGENT_NETWORK_SUBNET", raw)
    if ipaddress.ip_network(subnet).num_addresses < 8:
        raise ConfigError("UTOPIA_AGENT_NETWORK_SUBNET", f"{subnet} is too small for claims (at least a /29)")
    return subnet


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_ipv4_network(name, part) for part in env.get(name, "").split(",") if part.strip()))


def _blocked_networks(env: Mapping[str, str]) -> tuple[str, ...]:
    """The clouds' endpoints, less those UTOPIA_AGENT_UNBLOCKED_NETWORKS takes away (each must be
    one of them: a typo must not pass for an opening), plus UTOPIA_AGENT_BLOCKED_NETWORKS."""
    unblocked = _networks(env, "UTOPIA_AGENT_UNBLOCKED_NETWORKS")
    unknown = [network for network in unblocked if network not in CLOUD_METADATA_NETWORKS]
    if unknown:
        raise ConfigError("UTOPIA_AGENT_UNBLOCKED_NETWORKS",
                          f"{', '.join(unknown)} is not blocked by default (those are {', '.join(CLOUD_METADATA_NETWORKS)})")
    kept = tuple(network for network in CLOUD_METADATA_NETWORKS if network not in unblocked)
    return tuple(dict.fromkeys(kept + _networks(env, "UTOPIA_AGENT_BLOCKED_NETWORKS")))


def _claim_default(env: Mapping[str, str], name: str, default: float, capacity: float, low: float, unit: str) -> float:
    """A limit every claim without GPUs gets unless it asks for its own: `default`, or a quarter of
    the claims' capacity on a node too small for that; never more than the capacity."""
    raw = env.get(name)
    if raw is None or raw == "":
        return max(low, min(default, capacity * SMALL_NODE_DEFAULT_FRACTION))
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    if not low <= value <= capacity:
        raise ConfigError(name, f"expected {low:g} to {capacity:g} {unit} (the claims' capacity), got {raw!r}")
    return value


def _volume_roots(env: Mapping[str, str]) -> tuple[Path, ...]:
    raw = env.get("UTOPIA_AGENT_VOLUME_ROOTS", "")
    roots = tuple(Path(part) for part in raw.split(":") if part)
    for root in roots:
        if not root.is_absolute():
            raise ConfigError("UTOPIA_AGENT_VOLUME_ROOTS", f"{root} is not an absolute path")
    return roots


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve_denied_paths(env: Mapping[str, str], extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """SYSTEM_PATHS, the agent's install dir and interpreter, and its token file, with symlinks resolved."""
    install_dir = Path(__file__).resolve().parents[1]
    paths = {*SYSTEM_PATHS, str(install_dir), sys.prefix, *extra}
    for secret in ("UTOPIA_AGENT_TOKEN_FILE", "UTOPIA_AGENT_READ_TOKEN_FILE", KEY_VARIABLE):
        if env.get(secret):
            paths.add(env[secret])
    return tuple(sorted({os.path.realpath(p) for p in paths} | set(paths)))


def check_volume_roots(roots: tuple[Path, ...], state_dir: Path, denied: tuple[str, ...]) -> None:
    """Refuse roots that would open the host's system, the engine's state or the agent itself.

    Inside the state dir only STATE_DIR/volumes (the default root) and what lies below it may be
    a root: the lock, the pinned mounts and the metrics stay the agent's alone.
    """
    state = os.path.realpath(state_dir)
    own_volumes = os.path.join(state, "volumes")
    for root in roots:
        try:
            real = os.path.realpath(root, strict=False)
        except OSError as exc:  # a link the agent may not read (/proc/1/root): nothing proves where it leads
            raise ConfigError("UTOPIA_AGENT_VOLUME_ROOTS", f"{root} cannot be resolved ({exc.strerror})") from None
        if _within(state, real) or (_within(real, state) and not _within(real, own_volumes)):
            raise ConfigError("UTOPIA_AGENT_VOLUME_ROOTS", f"{root} would expose the agent's state dir {state_dir}")
        for path in denied:
            if _within(real, path) or _within(path, real):
                raise ConfigError("UTOPIA_AGENT_VOLUME_ROOTS", f"{root} overlaps {path}, which no volume may reach")


def load_config(env: Mapping[str, str] | None = None, ephemeral_ports_path: Path = EPHEMERAL_PORTS_PATH) -> Config:
    """Build the configuration from environment variables; raise ConfigError naming the bad one."""
    env = os.environ if env is None else env
    state_dir = Path(env.get("UTOPIA_AGENT_STATE_DIR") or "/var/lib/utopia-agent")
    if not state_dir.is_absolute():
        raise ConfigError("UTOPIA_AGENT_STATE_DIR", f"{state_dir} is not an absolute path")
    volume_roots = _volume_roots(env)
    node = NodeResources.read()
    denied = resolve_denied_paths(env)
    check_volume_roots(volume_roots, state_dir, tuple(p for p in denied if not _within(p, os.path.realpath(state_dir))))
    token, read_token = _tokens(env)
    reserved_cpus = _reserve(env, "UTOPIA_AGENT_RESERVED_CPUS", 1.0, len(node.cpus), "CPUs")
    reserved_memory_mb = int(_reserve(env, "UTOPIA_AGENT_RESERVED_MEMORY_MB", 2048, node.memory_mb, "MB"))
    return Config(
        token=token,
        read_token=read_token,
        tls=_tls(env),
        bind=env.get("UTOPIA_AGENT_BIND") or "0.0.0.0:8600",
        workers=_int(env, "UTOPIA_AGENT_WORKERS", 4, high=64),
        node_id=env.get("UTOPIA_AGENT_NODE_ID") or socket.gethostname(),
        state_dir=state_dir,
        gpu_backend=_choice(env, "UTOPIA_AGENT_GPU_BACKEND", "auto", GPU_BACKENDS),
        fake_gpu_count=_int(env, "UTOPIA_AGENT_FAKE_GPU_COUNT", 8, low=0, high=64),
        volume_roots=volume_roots,
        host_port_range=_port_range(env, "UTOPIA_AGENT_HOST_PORT_RANGE", ephemeral_port_range(ephemeral_ports_path)),
        pull_timeout=_seconds(env, "UTOPIA_AGENT_PULL_TIMEOUT", 1800.0),
        pull_idle_timeout=_seconds(env, "UTOPIA_AGENT_PULL_IDLE_TIMEOUT", 120.0),
        engine_timeout=_seconds(env, "UTOPIA_AGENT_ENGINE_TIMEOUT", 10.0),
        read_timeout=_seconds(env, "UTOPIA_AGENT_READ_TIMEOUT", 10.0),
        stop_timeout=_int(env, "UTOPIA_AGENT_STOP_TIMEOUT", 5, low=0, high=300),
        prometheus_auth=_choice(env, "UTOPIA_AGENT_PROMETHEUS_AUTH", "token", PROMETHEUS_AUTH_MODES),
        log_format=_choice(env, "UTOPIA_AGENT_LOG_FORMAT", "json", LOG_FORMATS),
        max_body_bytes=_int(env, "UTOPIA_AGENT_MAX_BODY_BYTES", 64 * 1024, low=1024),
        pids_limit=_int(env, "UTOPIA_AGENT_PIDS_LIMIT", 4096, low=16),
        log_max_size=env.get("UTOPIA_AGENT_LOG_MAX_SIZE") or "50m",
        log_max_files=_int(env, "UTOPIA_AGENT_LOG_MAX_FILES", 3, high=100),
        restart_policy=_choice(env, "UTOPIA_AGENT_RESTART_POLICY", "unless-stopped", RESTART_POLICIES),
        unstarted_seconds=_seconds(env, "UTOPIA_AGENT_UNSTARTED_SECONDS", 60.0),
        reserved_cpus=reserved_cpus,
        reserved_memory_mb=reserved_memory_mb,
        cpu_pinning=_choice(env, "UTOPIA_AGENT_CPU_PINNING", "numa", PINNING_MODES),
        log_follow_seconds=_seconds(env, "UTOPIA_AGENT_LOG_FOLLOW_SECONDS", 300.0),
        infiniband_dir=Path(env.get("UTOPIA_AGENT_INFINIBAND_DIR") or "/dev/infiniband"),
        gpu_release_seconds=_seconds(env, "UTOPIA_AGENT_GPU_RELEASE_SECONDS", 60.0),
        nvml_timeout=_seconds(env, "UTOPIA_AGENT_NVML_TIMEOUT", 5.0),
        network_isolation=_choice(env, "UTOPIA_AGENT_NETWORK_ISOLATION", "on", ("on", "off")) == "on",
        network_subnet=_network_subnet(env),
        blocked_networks=_blocked_networks(env),
        **_claim_defaults(env, node, reserved_cpus, reserved_memory_mb),
        **_image_gc(env),
        disk_pressure_percent=_int(env, "UTOPIA_AGENT_DISK_PRESSURE_PERCENT", 10, low=0, high=100),
        events_history=_int(env, "UTOPIA_AGENT_EVENTS_HISTORY", 10000, high=10_000_000),
        events_heartbeat_seconds=_seconds(env, "UTOPIA_AGENT_EVENTS_HEARTBEAT_SECONDS", 15.0),
        exec_idle_seconds=_seconds(env, "UTOPIA_AGENT_EXEC_IDLE_SECONDS", 600.0),
        exec_output_bytes=_int(env, "UTOPIA_AGENT_EXEC_OUTPUT_BYTES", 1024 * 1024, low=1024, high=64 * 1024 * 1024),
        exec_sessions_per_claim=_int(env, "UTOPIA_AGENT_EXEC_SESSIONS_PER_CLAIM", 8, high=MAX_EXEC_SESSIONS),
        disk_quota=_choice(env, "UTOPIA_AGENT_DISK_QUOTA", "auto", DISK_QUOTA_MODES),
        default_disk_gb=_gb(env, "UTOPIA_AGENT_DEFAULT_DISK_GB", DEFAULT_DISK_GB, zero=False) or DEFAULT_DISK_GB,
        reserved_disk_gb=_gb(env, "UTOPIA_AGENT_RESERVED_DISK_GB", None, zero=True),
        denied_paths=denied,
        claim_volumes_dir=_claim_volumes_dir(env, volume_roots or (state_dir / "volumes",)),
        claim_volume_backend=_choice(env, "UTOPIA_AGENT_CLAIM_VOLUME_BACKEND", "auto", CLAIM_VOLUME_BACKENDS),
    )


def _claim_defaults(env: Mapping[str, str], node: NodeResources, reserved_cpus: float, reserved_memory_mb: int) -> dict[str, float]:
    """The CPUs and memory of a claim without GPUs that asks for none: never unlimited."""
    capacity_cpus, capacity_memory_mb = node.capacity(reserved_cpus, reserved_memory_mb)
    cpus = _claim_default(env, "UTOPIA_AGENT_DEFAULT_CPUS", DEFAULT_CLAIM_CPUS, capacity_cpus, CPU_STEP, "CPUs")
    memory_mb = _claim_default(env, "UTOPIA_AGENT_DEFAULT_MEMORY_MB", DEFAULT_CLAIM_MEMORY_MB, capacity_memory_mb, MIN_MEMORY_MB, "MB")
    return {"default_cpus": round(math.floor(cpus / CPU_STEP + 1e-9) * CPU_STEP, 2), "default_memory_mb": int(memory_mb)}


def _claim_volumes_dir(env: Mapping[str, str], volume_roots: tuple[Path, ...]) -> Path | None:
    """An absolute folder apart from every host volume root: a tenant's host volume must never reach another's claim volume."""
    raw = env.get("UTOPIA_AGENT_CLAIM_VOLUMES_DIR")
    if not raw:
        return None
    folder = Path(raw)
    if not folder.is_absolute():
        raise ConfigError("UTOPIA_AGENT_CLAIM_VOLUMES_DIR", f"{raw} is not an absolute path")
    real = os.path.realpath(folder)
    for root in volume_roots:
        if _within(real, os.path.realpath(root)) or _within(os.path.realpath(root), real):
            raise ConfigError("UTOPIA_AGENT_CLAIM_VOLUMES_DIR", f"{raw} overlaps the volume root {root}")
    return folder


def _image_gc(env: Mapping[str, str]) -> dict[str, float]:
    """Image collection's marks (percent of the image filesystem; HIGH 100 turns it off), minimum age and interval."""
    high = _int(env, "UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT", 85, high=100)
    low = _int(env, "UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT", min(80, high - 1), low=0, high=99)
    if low >= high:
        raise ConfigError("UTOPIA_AGENT_IMAGE_GC_LOW_PERCENT", f"expected less than UTOPIA_AGENT_IMAGE_GC_HIGH_PERCENT ({high}), got {low}")
    return {
        "image_gc_high_percent": high,
        "image_gc_low_percent": low,
        "image_gc_min_age": _seconds(env, "UTOPIA_AGENT_IMAGE_GC_MIN_AGE", 120.0, zero=True),
        "image_gc_interval": _seconds(env, "UTOPIA_AGENT_IMAGE_GC_INTERVAL", 60.0),
    }


def prepare_state_dir(config: Config) -> None:
    """Create the state dir and prove it is writable, so a bad one stops the agent at start."""
    try:
        config.state_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=config.state_dir).close()
    except OSError as exc:
        raise ConfigError("UTOPIA_AGENT_STATE_DIR", f"cannot write {config.state_dir}: {exc.strerror}") from None
