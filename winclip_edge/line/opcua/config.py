"""What the OPC UA face listens on and whom it lets in, as data; safe by default. Importing it needs no OPC UA
library, so a command line checks its flags before anything starts.

Security follows the HTTP face (``service/config.py``): a loopback bind with no credentials serves anonymous
clients without encryption (a client on the same machine); anything else serves only the Basic256Sha256
SignAndEncrypt policy and requires a user + password or a trusted client certificate. A non-loopback bind with
neither is refused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import WinclipError
from ...service.config import is_loopback

DEFAULT_PORT = 4840  # the port IANA registered for OPC UA
USERNAME_ENV = "WINCLIP_OPCUA_USERNAME"
PASSWORD_ENV = "WINCLIP_OPCUA_PASSWORD"


class OpcuaError(WinclipError, RuntimeError):
    """The OPC UA face cannot start as configured (unsafe bind, bad certificate, port taken, missing extra)."""


@dataclass(frozen=True)
class OpcuaConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    username: str | None = None  # with password: the one user a secure endpoint accepts (see from_env)
    password: str | None = None
    trusted_clients: tuple[str, ...] = ()  # client certificates (DER or PEM files) allowed in without a password
    certificate: str | None = None  # the server's application certificate (DER or PEM) ...
    private_key: str | None = None  # ... and its key (PEM); both or neither
    certificate_dir: str | None = None  # without them: a self-signed pair is made here once and kept
    application_uri: str = "urn:winclip-edge:station"
    server_name: str = "winclip-edge station"
    poll_s: float = 0.25  # how often the face reads the station's state and recipes
    max_pending_results: int = 1000  # results waiting to become events; more are counted and dropped

    @classmethod
    def from_env(cls, **fields) -> "OpcuaConfig":
        """A config whose user and password come from WINCLIP_OPCUA_USERNAME / WINCLIP_OPCUA_PASSWORD (never from
        the command line, which other users of the machine can read)."""
        fields.setdefault("username", os.environ.get(USERNAME_ENV) or None)
        fields.setdefault("password", os.environ.get(PASSWORD_ENV) or None)
        return cls(**fields)

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"opc.tcp://{host}:{self.port}"

    @property
    def secure(self) -> bool:
        """True: Basic256Sha256 SignAndEncrypt only, no anonymous access (any non-loopback bind, or credentials)."""
        return not is_loopback(self.host) or bool(self.username or self.trusted_clients)

    def check(self) -> None:
        """Refuse unsafe or impossible settings with one line that says what to do."""
        if not 1 <= self.port <= 65535:
            raise OpcuaError(f"OPC UA port {self.port} is out of range (1-65535)")
        if self.poll_s <= 0:
            raise OpcuaError(f"the OPC UA poll interval must be > 0 s, got {self.poll_s}")
        if self.max_pending_results < 1:
            raise OpcuaError(f"max_pending_results must be >= 1, got {self.max_pending_results}")
        if bool(self.username) != bool(self.password):
            raise OpcuaError(f"OPC UA needs both a user and a password ({USERNAME_ENV} and {PASSWORD_ENV}), "
                             "or neither")
        if bool(self.certificate) != bool(self.private_key):
            raise OpcuaError("the OPC UA server certificate needs its private key and the key its certificate: "
                             "give both, or neither (a self-signed pair is then made in certificate_dir)")
        for path in (*self.trusted_clients, self.certificate, self.private_key):
            if path and not Path(path).is_file():
                raise OpcuaError(f"OPC UA certificate file {path} does not exist")
        if not self.secure:
            return
        if not (self.username or self.trusted_clients):
            raise OpcuaError(f"--opcua {self.host}:{self.port} is reachable from other machines: set "
                             f"{USERNAME_ENV} and {PASSWORD_ENV} or give trusted client certificates "
                             "(anonymous access is served on loopback only)")
        if not self.certificate and not self.certificate_dir:
            raise OpcuaError("a secure OPC UA endpoint (Basic256Sha256) needs a server certificate: give "
                             "certificate + private_key, or certificate_dir to make and keep a self-signed one")

