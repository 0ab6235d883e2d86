"""Certificates made with the openssl command, as an operator makes them (README "HTTPS").

A CA signs server certificates (subjectAltName 127.0.0.1 and localhost, serverAuth) and client
certificates (clientAuth) through `openssl ca`, which also sets any validity window, such as
one that ended already.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CA_CONFIG = """\
[ca]
default_ca = signer
[signer]
database = {dir}/index.txt
new_certs_dir = {dir}
serial = {dir}/serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
"""
SERVER_EXTENSIONS = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
CLIENT_EXTENSIONS = "extendedKeyUsage=clientAuth\n"
# EC keys: made in milliseconds; KEY_RSA for what an operator would more often run (the benchmark).
KEY_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
KEY_RSA = ("-newkey", "rsa:2048")


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _openssl_time(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%SZ", time.gmtime(seconds))


class CertificateAuthority:
    """A CA in `directory`, named `name`, that issues pairs into that directory."""

    def __init__(self, directory: Path, name: str = "test-ca", key: tuple[str, ...] = KEY_EC):
        self.directory = directory
        self.name = name
        self.key_args = key
        directory.mkdir(parents=True, exist_ok=True)
        self.cert, self.key = directory / f"{name}.pem", directory / f"{name}.key"
        openssl("req", "-x509", *key, "-nodes", "-keyout", str(self.key), "-out", str(self.cert), "-subj", f"/CN={name}", "-days", "30", cwd=directory)
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        self.config = directory / f"{name}.cnf"
        self.config.write_text(CA_CONFIG.format(dir=directory))

    def issue(self, name: str, client: bool = False, not_before: float | None = None, not_after: float | None = None) -> Pair:
        """A certificate for `name` signed by this CA (server, else client), valid from an hour ago for 30 days unless told."""
        now = time.time()
        pair = Pair(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        request = self.directory / f"{name}.csr"
        extensions = self.directory / f"{name}.ext"
        extensions.write_text(CLIENT_EXTENSIONS if client else SERVER_EXTENSIONS)
        openssl("req", *self.key_args, "-nodes", "-keyout", str(pair.key), "-out", str(request), "-subj", f"/CN={name}", cwd=self.directory)
        openssl(
            "ca", "-batch", "-notext", "-config", str(self.config), "-cert", str(self.cert), "-keyfile", str(self.key),
            "-in", str(request), "-out", str(pair.cert), "-extfile", str(extensions),
            "-startdate", _openssl_time(not_before if not_before is not None else now - 3600),
            "-enddate", _openssl_time(not_after if not_after is not None else now + 30 * 86400),
            cwd=self.directory,
        )
        return pair


@dataclass(frozen=True)
class Pki:
    """A CA with the server pair of an agent (127.0.0.1, localhost) and a client pair it signed."""

    authority: CertificateAuthority
    server: Pair
    client: Pair

    @classmethod
    def make(cls, directory: Path, name: str = "test-ca", key: tuple[str, ...] = KEY_EC) -> Pki:
        authority = CertificateAuthority(directory, name, key)
        return cls(authority, authority.issue("server"), authority.issue("client", client=True))

    @property
    def ca_file(self) -> Path:
        return self.authority.cert


def tls_env(pair: Pair, client_ca: Path | None = None) -> dict[str, str]:
    """The agent's variables to serve HTTPS with `pair` (and ask for client certificates signed by `client_ca`)."""
    env = {"UTOPIA_AGENT_TLS_CERT_FILE": str(pair.cert), "UTOPIA_AGENT_TLS_KEY_FILE": str(pair.key)}
    if client_ca is not None:
        env["UTOPIA_AGENT_TLS_CLIENT_CA_FILE"] = str(client_ca)
    return env
