"""Issue 11 row 11 / item 8: 16 idle TCP connections to the metrics port made every scrape
fail until they timed out (60 s each). Now a request head must arrive within 5 s, and
while every slot is taken a newcomer closes the oldest connection still sending its head.
The exporter also serves HTTPS, configured like Prometheus exporter-toolkit's
``tls_server_config``; the default bind stays loopback."""

from __future__ import annotations

import datetime
import socket
import ssl
import time

import pytest

from tests.hostile import harness as h


def test_scrapes_served_while_idle_and_slow_connections_are_open(tmp_path) -> None:
    srv = h.start_agent(tmp_path)
    socks: list[socket.socket] = []
    try:
        for i in range(32):
            s = h.connect_from(f"127.9.1.{i + 1}", srv.metrics)
            if i % 2:
                s.send(b"GET /metr")  # slow: a head that never ends
            socks.append(s)
        time.sleep(0.5)
        for _ in range(3):
            body = h.scrape(srv.metrics, timeout=20)
            assert "xwamp_build_info" in body
        srv.wait_log(r"metrics port: closed an idle connection for a scrape")
        assert srv.alive() and srv.rss_growth() < h.RSS_BOUND
    finally:
        for s in socks:
            s.close()
        srv.stop()


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xwamp test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cf, kf = tmp_path / "cert.pem", tmp_path / "key.pem"
    cf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return cf, kf


def test_metrics_over_tls(tmp_path) -> None:
    cf, kf = _self_signed(tmp_path)
    srv = h.start_agent(tmp_path, exporter_toml=f'[exporter.tls_server_config]\ncert_file = "{cf}"\n'
                                                f'key_file = "{kf}"\n')
    try:
        ctx = ssl.create_default_context(cafile=str(cf))
        assert "xwamp_build_info" in h.scrape(srv.metrics, scheme="https", context=ctx)
        with pytest.raises(Exception):
            h.scrape(srv.metrics)  # plain HTTP is not served on a TLS port
        assert srv.alive()
    finally:
        srv.stop()


def test_tls_config_validation(tmp_path) -> None:
    from agent.daemon import config as cfg

    cf, kf = _self_signed(tmp_path)
    base = {"cert_file": str(cf), "key_file": str(kf)}
    t = cfg.parse({"exporter": {"tls_server_config": base}}).exporter.tls
    assert t is not None and t.client_auth_type == "NoClientCert"
    t = cfg.parse({"exporter": {"tls_server_config": dict(base, client_ca_file=str(cf))}}).exporter.tls
    assert t is not None and t.client_auth_type == "RequireAndVerifyClientCert"
    assert cfg.parse({}).exporter.tls is None and cfg.parse({}).exporter.listen == "127.0.0.1"
    for bad, where in (({"cert_file": str(cf)}, "key_file"), (dict(base, client_auth_type="RequireAnyClientCert"),
                                                               "client_auth_type"),
                       (dict(base, client_auth_type="VerifyClientCertIfGiven"), "client_ca_file")):
        with pytest.raises(cfg.ConfigError, match=f"exporter.tls_server_config.{where}"):
            cfg.parse({"exporter": {"tls_server_config": bad}})
