"""TLS for Dask distributed: encrypted, mutually authenticated scheduler/worker/client links.

A Dask scheduler accepts any client that can reach its port and runs whatever that client sends
(pickled functions). Outside one trusted machine the links must therefore be TLS with client
certificates signed by a CA the cluster trusts: then only holders of a signed key can submit work.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hoverdask.core.errors import HoverdaskError

if TYPE_CHECKING:
    from distributed import Security


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for one deployment: the CA that signs, and one certificate + key pair."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def tls_security(ca_file: str | Path, cert_file: str | Path, key_file: str | Path) -> Security:
    """Return a `distributed.Security` that requires TLS everywhere and trusts only `ca_file`.

    The same certificate serves the scheduler, the workers and the client; every peer must present
    a certificate signed by the CA (mutual TLS), so a plain or unsigned client is refused.
    """
    from distributed import Security

    paths = {"CA": Path(ca_file), "certificate": Path(cert_file), "key": Path(key_file)}
    for role, path in paths.items():
        if not path.is_file():
            raise HoverdaskError(f"TLS {role} file {path} does not exist")
    ca, cert, key = (str(path) for path in paths.values())
    return Security(
        require_encryption=True,
        tls_ca_file=ca,
        tls_client_cert=cert,
        tls_client_key=key,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
    )


def make_self_signed(
    directory: str | Path, hostname: str = "localhost", days: int = 365
) -> TlsFiles:
    """Write a private CA and a certificate it signs for `hostname` (and 127.0.0.1) to `directory`.

    For tests and for trying TLS on one machine; production sites use their own CA. Needs the
    `openssl` command (present on practically every Linux and macOS machine).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise HoverdaskError("the `openssl` command is needed to make certificates; install it")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(out / "ca.pem", out / "cert.pem", out / "key.pem")
    ca_key, csr, ext = out / "ca-key.pem", out / "cert.csr", out / "cert.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        f"subjectAltName=DNS:{hostname},DNS:localhost,IP:127.0.0.1\n"
    )
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out",
         files.ca_file, "-days", days, "-subj", "/CN=hoverdask test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", files.key_file, "-out", csr,
         "-subj", f"/CN={hostname}"],
        ["x509", "-req", "-in", csr, "-CA", files.ca_file, "-CAkey", ca_key, "-CAcreateserial",
         "-out", files.cert_file, "-days", days, "-extfile", ext],
    ]  # fmt: skip
    for args in steps:
        done = subprocess.run(
            [openssl, *map(str, args)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise HoverdaskError(f"openssl {args[0]} failed: {done.stderr.strip()}")
    for scratch in (csr, ext):
        scratch.unlink()
    files.key_file.chmod(0o600)
    ca_key.chmod(0o600)
    return files
