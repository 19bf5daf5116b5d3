"""Test certificates: one self-signed PEM certificate and key (cryptography, else the openssl CLI)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def make_cert(folder: Path, name: str = "localhost", ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A self-signed certificate (also its own CA) for DNS `name` and `ips`, valid two days: (cert, key)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    try:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        san = ",".join([*(f"IP:{ip}" for ip in ips), f"DNS:{name}"])
        r = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
                            "-addext", f"subjectAltName={san}"], capture_output=True)
        if r.returncode:
            pytest.skip(f"no cryptography package and openssl failed: {r.stderr.decode()[-300:]}")
        return cert, key
    pk = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = [*(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips), x509.DNSName(name)]
    crt = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(pk.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
           .not_valid_after(now + datetime.timedelta(days=2))
           .add_extension(x509.SubjectAlternativeName(san), critical=False)
           .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
           .sign(pk, hashes.SHA256()))
    cert.write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(pk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cert, key
