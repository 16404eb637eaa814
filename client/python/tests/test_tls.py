"""TLS from the Python client (the standard library's ``ssl``) against a
broker with ``tls_cert``: certificates are made per test with the
``openssl`` command line into a temp dir."""

import os
import subprocess
import time
from pathlib import Path

import pytest

import shoal


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(d: Path, ca: str, name: str, cn: str, ext: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d,
    )
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d,
    )


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
        cwd=d,
    )


@pytest.fixture
def pki(tmp_path):
    """A CA, a broker certificate for 127.0.0.1, a client certificate
    (CN ``py-writer``) and an unrelated CA."""
    _ca(tmp_path, "ca")
    _ca(tmp_path, "other")
    _issue(tmp_path, "ca", "broker", "broker",
           "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n")
    _issue(tmp_path, "ca", "writer", "py-writer", "extendedKeyUsage=clientAuth\n")
    return tmp_path


def _toml(d: Path, client_ca: bool = False) -> str:
    t = f'tls_cert = "{d}/broker.pem"\ntls_key = "{d}/broker.key"\n'
    if client_ca:
        t += f'tls_client_ca = "{d}/ca.pem"\n'
    return t


def test_tls_round_trip_wrong_ca_and_plaintext(pki, topic_name):
    """The right CA produces and reads back; another CA fails the
    handshake; a plaintext client is told TlsRequired."""
    from conftest import Broker

    b = Broker(toml=_toml(pki))
    try:
        with shoal.Client(b.addr, tls_ca=str(pki / "ca.pem")) as c:
            c.create_topic(topic_name, partitions=1)
            p = shoal.Producer(c)
            sent = [b"tls-%d-" % i + bytes(range(256)) * 8 for i in range(500)]
            futs = [p.send(topic_name, v, partition=0) for v in sent]
            p.flush()
            for f in futs:
                f.result(timeout=10)
            cons = shoal.Consumer(c)
            cons.assign_all(topic_name, start="beginning")
            got = []
            deadline = time.monotonic() + 20
            while len(got) < len(sent):
                assert time.monotonic() < deadline, f"{len(got)} of {len(sent)}"
                got += cons.poll(timeout=1.0)
            assert [r.value for r in got] == sent
        with pytest.raises(shoal.ConnectError) as e:
            shoal.Client(b.addr, tls_ca=str(pki / "other.pem"), connect_timeout=3.0)
        # The handshake's refusal, not a timeout or a refused connection.
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value), str(e.value)
        with pytest.raises(shoal.TlsRequiredError):
            shoal.Client(b.addr, connect_timeout=3.0)
    finally:
        b.cleanup()


def test_a_client_certificate_is_the_principal(pki, topic_name):
    """With auth on and client certificates requested, the certificate's
    CN is the principal: refused until an ACL allows it, then allowed."""
    from conftest import Broker, shoal_bin

    b = Broker(
        toml=_toml(pki, client_ca=True),
        extra=["--auth", "--superuser", "admin"],
        env={"SHOAL_ADMIN_PASSWORD": "pw-1"},
    )
    ca = str(pki / "ca.pem")
    try:
        with shoal.Client(b.addr, user="admin", password="pw-1", tls_ca=ca) as admin:
            admin.create_topic(topic_name, partitions=1)
        cert, key = str(pki / "writer.pem"), str(pki / "writer.key")

        def acl_add(operation: str) -> None:
            # With the CLI, over TLS.
            subprocess.run(
                [
                    shoal_bin(), "--broker", b.addr, "--user", "admin", "--tls-ca", ca,
                    "acl", "add", "--principal", "py-writer", "--topic", topic_name,
                    "--operation", operation,
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "SHOAL_PASSWORD": "pw-1", "SHOAL_DISCOVERY_CACHE": "off"},
            )

        # Metadata shows a principal only the topics it may describe.
        acl_add("describe")
        with shoal.Client(b.addr, tls_ca=ca, tls_cert=cert, tls_key=key) as w:
            with pytest.raises(shoal.AuthorizationFailedError):
                shoal.Producer(w).send(topic_name, b"no", partition=0).result(timeout=10)
        acl_add("produce")
        with shoal.Client(b.addr, tls_ca=ca, tls_cert=cert, tls_key=key) as w:
            shoal.Producer(w).send(topic_name, b"yes", partition=0).result(timeout=10)
    finally:
        b.cleanup()

