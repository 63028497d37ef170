"""Development TLS certificates for a Flower deployment (the ``cryptography`` package).

``fedward flower certs DIR --host server.example.org`` writes a private CA (``ca.crt``,
``ca.key``) and a server certificate signed by it (``server.pem``, ``server.key``) valid for
the given host names / IP addresses and for localhost. The SuperLink serves ``server.pem``;
each SuperNode and the ``flwr`` CLI trust ``ca.crt``. For production use certificates from the
hospital's own PKI; these are for trials and tests.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


def node_key_names(client_id: int) -> tuple[str, str]:
    """A SuperNode's key pair for Flower's SuperNode authentication: (private, public)."""
    return f"node-{client_id}.key", f"node-{client_id}.pub"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedward"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def generate_certificates(folder: str | Path, hosts: list[str] | tuple[str, ...] = (), days: int = 365) -> dict[str, Path]:
    """Write a CA and a server certificate for ``hosts`` (plus 127.0.0.1, ::1 and localhost)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedward development CA")).issuer_name(_name("fedward development CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(valid_from).not_valid_after(valid_to)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    names = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1", "::1"]))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (x509.CertificateBuilder().subject_name(_name(names[0])).issuer_name(ca_cert.subject)
                   .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(valid_from).not_valid_after(valid_to)
                   .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in names]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA256()))

    paths = {name: folder / name for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)}
    paths[CA_CERT].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, paths[CA_KEY])
    paths[SERVER_CERT].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(server_key, paths[SERVER_KEY])
    return paths


def generate_node_keys(folder: str | Path, client_ids: list[int] | range) -> dict[str, Path]:
    """One EC (P-384) key pair per SuperNode, in the OpenSSH formats Flower reads: the private key
    goes to the hospital (``fedward flower supernode --auth-key``), the public key is registered on
    the SuperLink (``fedward flower register-node``). An existing pair is kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for client_id in client_ids:
        private, public = (folder / name for name in node_key_names(client_id))
        if not (private.is_file() and public.is_file()):
            key = ec.generate_private_key(ec.SECP384R1())
            private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                  serialization.NoEncryption()))
            private.chmod(0o600)
            public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                             serialization.PublicFormat.OpenSSH) + b"\n")
        paths[private.name], paths[public.name] = private, public
    return paths
