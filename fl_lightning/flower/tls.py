"""Certificates and keys for a Flower federation with TLS and SuperNode authentication.

- :func:`make_ca` / :func:`make_server_cert`: a self-signed certificate authority (CA) and a
  server certificate it signs, for the SuperLink's addresses (``127.0.0.1`` and ``localhost``
  by default), written as PEM files (private keys readable by their owner only);
- :func:`make_node_keys`: a SuperNode's authentication key pair (NIST P-384, OpenSSH format,
  as ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read
  them);
- :func:`check_pem`: a given certificate or key file is readable PEM (one line if not).

Nothing here is secret management: the files are written where asked, and copying the CA
certificate and each node's private key to the machines that need them is the operator's
job (see ``docs/deployment.md``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from fl_lightning.errors import ConfigError

__all__ = ["check_given", "check_pem", "make_ca", "make_node_keys", "make_server_cert"]

VALID_DAYS = 365


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file, then ``os.replace``); a
    private key is created readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_ca(
    folder: str | os.PathLike, name: str = "fl-lightning federation CA"
) -> tuple[Path, Path]:
    """A new self-signed CA in ``folder``: ``(ca.crt, ca.key)``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA384())
    )
    crt_path, key_path = folder / "ca.crt", folder / "ca.key"
    _write(key_path, _pem_key(key), private=True)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return crt_path, key_path


def make_server_cert(
    folder: str | os.PathLike, ca_cert: str | os.PathLike, ca_key: str | os.PathLike,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
) -> tuple[Path, Path]:
    """A server certificate for ``hosts`` (IP addresses and DNS names, as subject alternative
    names) signed by the CA: ``(server.crt, server.key)`` in ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA384())
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    crt_path, key_path = folder / "server.crt", folder / "server.key"
    _write(key_path, _pem_key(key), private=True)
    _write(crt_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return crt_path, key_path


def make_node_keys(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (P-384, OpenSSH format): ``(<name>,
    <name>.pub)`` in ``folder``; the public key is what the SuperLink's operator registers
    (``flwr supernode register <name>.pub``), the private key stays on the node."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    priv_path, pub_path = folder / name, folder / f"{name}.pub"
    _write(priv_path, private, private=True)
    _write(pub_path, public + b"\n", private=False)
    return priv_path, pub_path


def check_pem(path: str | os.PathLike, option: str, kind: str) -> Path:
    """``path`` as an absolute path, if it is a readable PEM file holding a ``kind``
    (``"certificate"`` or ``"private key"``); else one line naming ``option`` and the fix."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise ConfigError(f"{option}={str(path)!r} is invalid: it must be an existing PEM "
                          f"{kind} file")
    try:
        data = p.read_bytes()
        if kind == "certificate":
            x509.load_pem_x509_certificate(data)
        else:
            serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{option}={str(path)!r} is invalid: it must be a PEM {kind} file "
                          f"without a passphrase ({type(err).__name__}: "
                          f"{' '.join(str(err).split())[:120]})") from None
    return p


def check_given(ca_cert: Path, server_cert: Path, server_key: Path, host: str = "127.0.0.1",
                ) -> None:
    """Given certificates that can work: the server certificate names ``host`` (as an IP or
    DNS subject alternative name), the CA signed it, and the key is its key; else one line
    saying which and how to fix it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    crt = x509.load_pem_x509_certificate(server_cert.read_bytes())
    key = serialization.load_pem_private_key(server_key.read_bytes(), password=None)
    try:
        sans = crt.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in sans.get_values_for_type(x509.IPAddress)]
        names += sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if host not in names:
        raise ConfigError(f"--server-cert={str(server_cert)!r} is invalid: it must name {host} "
                          f"as a subject alternative name (it names {names or 'none'}); the "
                          "SuperNodes connect to that address")
    try:
        crt.verify_directly_issued_by(ca)
    except Exception as err:  # noqa: BLE001 - InvalidSignature, ValueError, TypeError
        raise ConfigError(f"--server-cert={str(server_cert)!r} cannot be combined with "
                          f"--ca-cert={str(ca_cert)!r}: that CA did not sign it "
                          f"({type(err).__name__}); give the CA that issued it") from None
    mine = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if key.public_key().public_bytes(pem, mine) != crt.public_key().public_bytes(pem, mine):
        raise ConfigError(f"--server-key={str(server_key)!r} cannot be combined with "
                          f"--server-cert={str(server_cert)!r}: it is not that certificate's "
                          "key; give the key the certificate was made for")
