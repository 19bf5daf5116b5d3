"""TLS on the controller-to-leader hop of the Ray executor (the leader on another node, over TCP).

  --worker-tls-cert / --worker-tls-key  the leader's certificate and key: paths on every node that may
                                        host a leader, read there by the worker (worker/auth.py), never
                                        sent; default: the public port's --tls-cert / --tls-key
  --worker-tls-ca                       what the controller trusts for that certificate, read on the
                                        controller's host; default: the certificate itself (self-signed)
  --worker-tls-name                     the name the controller checks in it (it dials node IPs, so
                                        grpc.ssl_target_name_override); default: the certificate's
                                        first DNS subjectAltName, else its common name

The local executor's leader is on a unix socket and is never served over TLS.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger("shardserve.controller")

FLAGS = ("worker_tls_cert", "worker_tls_key", "worker_tls_ca", "worker_tls_name")


def certificate_name(path: Path) -> str:
    """The first DNS subjectAltName of the PEM certificate at `path`, else its common name, else ""."""
    try:  # CPython's own PEM reader (used by its test suite); no third-party package needed
        decoded = ssl._ssl._test_decode_cert(str(path))
    except (AttributeError, OSError, ssl.SSLError, ValueError):
        return ""
    dns = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    cn = [value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"]
    return (dns or cn or [""])[0]


def worker_tls(args, executor: str, public_cert: str | None, public_key: str | None) -> dict:
    """The ReplicaSpec fields tls_cert, tls_key, worker_tls_ca and worker_tls_name ({} = plaintext).
    Raises ValueError (the caller's ConfigError) naming the flag that is wrong."""
    given = {f: getattr(args, f, None) for f in FLAGS}
    if executor != "ray":
        if any(given.values()):
            log.warning("--worker-tls-* not used: the local executor's leader is on a unix socket")
        return {}
    cert, key = given["worker_tls_cert"], given["worker_tls_key"]
    if bool(cert) != bool(key):
        raise ValueError("--worker-tls-cert and --worker-tls-key go together: give both (PEM files) or neither")
    if not cert and public_cert:
        cert, key = public_cert, public_key  # the public port's, by default
    if not cert:
        if given["worker_tls_ca"] or given["worker_tls_name"]:
            raise ValueError("--worker-tls-ca / --worker-tls-name need --worker-tls-cert and --worker-tls-key "
                             "(or the public port's --tls-cert and --tls-key)")
        return {}
    here = Path(cert).is_file()
    ca = given["worker_tls_ca"] or cert
    if not Path(ca).is_file():
        if not given["worker_tls_ca"]:
            raise ValueError(f"--worker-tls-cert {cert}: not on this host, so the controller cannot trust it by "
                             "default: give --worker-tls-ca (the CA that signed it) and --worker-tls-name")
        raise ValueError(f"--worker-tls-ca {ca}: no such file")
    name = given["worker_tls_name"] or (certificate_name(Path(cert)) if here else "")
    if not name:
        raise ValueError(f"--worker-tls-name: no DNS name or common name found in {cert}; give the name the "
                         "leader's certificate carries")
    for flag, path in (("--worker-tls-cert", cert), ("--worker-tls-key", key)):
        if not Path(path).is_file():
            log.info("%s %s is not on this host: every node that may host a leader must have it", flag, path)
    # absolute: the worker runs in its actor's folder on its node
    return {"tls_cert": str(Path(cert).absolute()), "tls_key": str(Path(key).absolute()),
            "worker_tls_ca": str(Path(ca).absolute()), "worker_tls_name": name}
