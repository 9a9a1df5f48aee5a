"""Who may talk to a service: the admin token and TLS, read from TLBSIM_* variables.

One reader for every process, server and client side alike, so a `tlbsim up`
cluster, its services and the load generator share one configuration by
inheriting the environment (the CLI's global --token-file/--tls-* flags set it):

    TLBSIM_TOKEN / TLBSIM_TOKEN_FILE  the shared admin token (a file keeps it out of `ps`)
    TLBSIM_TLS_CERT, TLBSIM_TLS_KEY   this node's certificate and key (PEM): a server
                                      serves TLS with them; a client presents them
    TLBSIM_TLS_CA                     the CA (PEM) a client verifies servers with; with
                                      TLBSIM_TLS_CLIENT_AUTH=1 servers require client
                                      certificates signed by it (mutual TLS)
    TLBSIM_TLS_SERVER_NAME            the name to expect in server certificates (when
                                      addresses are not in their subjectAltName)
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path
from typing import Mapping

import grpc

from services.common.errors import InvalidArgument

TOKEN_HEADER = "tlbsim-token"  # gRPC metadata key of the admin token


@dataclasses.dataclass(frozen=True)
class Security:
    token: str = ""
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    tls_ca: bytes | None = None
    client_auth: bool = False
    server_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Security":
        def read(var: str) -> bytes | None:
            path = env.get(var)
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise InvalidArgument(f"{var}={path}: {e.strerror}") from None

        token = env.get("TLBSIM_TOKEN", "")
        if not token and env.get("TLBSIM_TOKEN_FILE"):
            token = (read("TLBSIM_TOKEN_FILE") or b"").decode().strip()
            if not token:
                raise InvalidArgument(f"TLBSIM_TOKEN_FILE={env['TLBSIM_TOKEN_FILE']} is empty")
        s = cls(token=token, tls_cert=read("TLBSIM_TLS_CERT"), tls_key=read("TLBSIM_TLS_KEY"),
                tls_ca=read("TLBSIM_TLS_CA"),
                client_auth=env.get("TLBSIM_TLS_CLIENT_AUTH", "") in ("1", "true", "yes"),
                server_name=env.get("TLBSIM_TLS_SERVER_NAME", ""))
        if (s.tls_cert is None) != (s.tls_key is None):
            raise InvalidArgument("TLS needs both TLBSIM_TLS_CERT and TLBSIM_TLS_KEY")
        if s.client_auth and (s.tls_ca is None or s.tls_cert is None):
            raise InvalidArgument("TLBSIM_TLS_CLIENT_AUTH needs TLBSIM_TLS_CA, "
                                  "TLBSIM_TLS_CERT and TLBSIM_TLS_KEY")
        return s

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS for a server with a certificate; None: plaintext."""
        if self.tls_cert is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_ca if self.client_auth else None,
            require_client_auth=self.client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS for a client that has a CA to verify servers with; None: plaintext."""
        if self.tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca,
                                            private_key=self.tls_key,
                                            certificate_chain=self.tls_cert)

    def token_required(self, listen: str) -> bool:
        """Admin calls need the token when one is set, and always beyond loopback."""
        return bool(self.token) or not is_loopback(listen)


def is_loopback(listen: str) -> bool:
    """Does a listen address (HOST:PORT) accept connections from this machine only?
    A wildcard (0.0.0.0, [::], empty) does not."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: whatever it resolves to, assume the network
