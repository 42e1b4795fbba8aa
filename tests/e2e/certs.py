"""Certificates made on the fly for the TLS tests: a CA, server certificates (good, expired,
for another host, from an unknown CA) and a client CA with a client certificate.

usage (also as a library): python certs.py DIR   -> writes the PEM files into DIR
"""

import datetime
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _write(dir: Path, name: str, cert, key) -> None:
    (dir / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (dir / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(dir: Path, name: str):
    key = _key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(f"scopegate test {name}"))
        .issuer_name(_name(f"scopegate test {name}"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + 30 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(dir, name, cert, key)
    return cert, key


def make_leaf(dir: Path, name: str, ca, hosts: list[str], client: bool = False,
              not_before=None, not_after=None):
    ca_cert, ca_key = ca
    key = _key()
    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - DAY)
        .not_valid_after(not_after or NOW + 30 * DAY)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write(dir, name, cert, key)
    return cert, key


def make_all(dir: Path) -> Path:
    """Writes every file the TLS tests use into DIR and returns DIR."""
    dir.mkdir(parents=True, exist_ok=True)
    ca = make_ca(dir, "ca")
    local = ["localhost", "127.0.0.1", "::1"]
    make_leaf(dir, "server", ca, local)
    # The same names, a fresh key: the certificate a renewal installs.
    make_leaf(dir, "server-renewed", ca, local)
    make_leaf(dir, "expired", ca, local, not_before=NOW - 10 * DAY, not_after=NOW - DAY)
    make_leaf(dir, "otherhost", ca, ["other.example"])
    rogue = make_ca(dir, "rogue-ca")
    make_leaf(dir, "rogue", rogue, local)
    client_ca = make_ca(dir, "client-ca")
    make_leaf(dir, "client", client_ca, ["agent-1"], client=True)
    make_leaf(dir, "rogue-client", rogue, ["agent-2"], client=True)
    return dir


if __name__ == "__main__":
    make_all(Path(sys.argv[1]))
