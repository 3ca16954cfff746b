"""A real gRPC server (`tkg.server.app.start`) on loopback, run on an event loop in a thread of the
test process: a real network path and the auth guard, without a subprocess's start-up cost."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Callable
from typing import Any

from tkg.server import app as app_mod
from tkg.server.app import ServeSettings
from tkg.server.config import ModelSpec, build_spec

TINY = {"num_layers": 2, "num_q_heads": 2, "num_kv_heads": 1, "head_dim": 8, "block_len": 4,
        "num_blocks": 64, "max_context": 64, "kv_dtype": "float32"}  # fmt: skip


class InProcServer:
    def __init__(self, settings: ServeSettings, spec: ModelSpec | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="inproc-server", daemon=True)
        self.thread.start()
        spec = spec or build_spec(dict(TINY))
        self.app: app_mod.App = self.run(lambda: app_mod.start(spec, settings))

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def run(self, make: Callable[[], Any]) -> Any:
        """Run `make()` (a coroutine, or a plain call) on the server's loop; its result."""

        async def go() -> Any:
            out = make()
            return await out if asyncio.iscoroutine(out) else out

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(60)

    def stop(self) -> None:
        self.run(lambda: self.app.shutdown(0.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def settings(**kw: Any) -> ServeSettings:
    return ServeSettings(backend="reference", host="127.0.0.1", port=0, metrics_port=None, **kw)


def make_pki(client_cn: str = "team-b", clients: dict[str, str] | None = None) -> dict[str, bytes]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate (CN=client_cn),
    all PEM, made here with `cryptography` (no files, no openssl binary). `clients`: more client
    certificates from the same CA, `{key: RFC 4514 subject}` -> `key_cert`, `key_key` (the subject
    is parsed by `cryptography`: `CN=team-a,O=Org` is two RDNs, `CN=team-a\\,O=Org` one CN)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())  # fmt: skip

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("tkg-test-ca")).issuer_name(name("tkg-test-ca"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip

    def leaf(cn: str | x509.Name, server: bool) -> tuple[bytes, bytes]:
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder().subject_name(name(cn) if isinstance(cn, str) else cn).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )  # fmt: skip
        if server:
            san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), pem_key(key)

    server_cert, server_key = leaf("localhost", True)
    client_cert, client_key = leaf(client_cn, False)
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    stranger = (
        x509.CertificateBuilder().subject_name(name(client_cn)).issuer_name(name(client_cn))
        .public_key(other_ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .sign(other_ca_key, hashes.SHA256())
    )  # fmt: skip
    more: dict[str, bytes] = {}
    for key, subject in (clients or {}).items():
        more[f"{key}_cert"], more[f"{key}_key"] = leaf(x509.Name.from_rfc4514_string(subject), False)
    return {
        **more,
        "ca": ca.public_bytes(serialization.Encoding.PEM), "server_cert": server_cert, "server_key": server_key,
        "client_cert": client_cert, "client_key": client_key,
        "stranger_cert": stranger.public_bytes(serialization.Encoding.PEM), "stranger_key": pem_key(other_ca_key),
    }  # fmt: skip
