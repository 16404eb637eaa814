"""SCRAM-SHA-256 against RFC 7677's test vector."""

import pytest

from shoal.scram import ScramClient, ScramError

SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def test_rfc7677_vector():
    c = ScramClient("user", "pencil", nonce="rOprNGfwEbeRWgbNEkqO")
    assert c.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert c.final(SERVER_FIRST) == CLIENT_FINAL
    c.verify(SERVER_FINAL)
    with pytest.raises(ScramError):
        c.verify(b"v=AAAATRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_bad_input():
    with pytest.raises(ScramError):
        ScramClient("a,b", "x")
    c = ScramClient("user", "pencil", nonce="abc")
    with pytest.raises(ScramError):
        c.final(b"r=xyz,s=AAAA,i=4096")  # another nonce
    with pytest.raises(ScramError):
        c.final(b"r=abcdef,s=AAAA,i=1")
    with pytest.raises(ScramError):
        c.final(b"nonsense")


def test_a_broker_with_auth(topic_name):
    """Against a broker started with --auth: the right credentials serve,
    none are refused with AuthenticationRequired, a wrong password with
    AuthenticationFailed."""
    import shoal
    from conftest import Broker

    b = Broker(extra=["--auth", "--superuser", "admin"], env={"SHOAL_ADMIN_PASSWORD": "pw-1"})
    try:
        with shoal.Client(b.addr, user="admin", password="pw-1") as c:
            c.create_topic(topic_name, partitions=1)
            p = shoal.Producer(c)
            p.send(topic_name, b"hello", partition=0).result(timeout=10)
            p.close()
            assert topic_name in [t.name for t in c.list_topics()]
        with pytest.raises(shoal.AuthenticationRequiredError):
            shoal.Client(b.addr, connect_timeout=2.0)
        with pytest.raises(shoal.AuthenticationFailedError):
            shoal.Client(b.addr, user="admin", password="wrong", connect_timeout=2.0)
    finally:
        b.cleanup()
