"""RFC 7717 against an independent peer written here from the RFC text.

The peer uses ``struct`` and raw ``cryptography`` calls only, never xwamp's codecs:
  * Server-Greeting (RFC 4656 §3.1, RFC 7717 Figure 2): Unused 12 | Modes 4 | Challenge 16
    | Salt 16 | Count 4 | MBZ 12;
  * Set-Up-Response (RFC 4656 §3.1; the sizes RFC 7717 §4.1 restates): Mode 4 | KeyID 80 |
    Token 64 | Client-IV 16; KeyID = SPIi 8 | SPIr 8 | zeros (RFC 7717 §5.3);
  * Token = AES-CBC, IV zero, of Challenge | AES key 16 | HMAC key 32 under the key from
    the shared secret (RFC 4656 §3.1);
  * shared secret = prf(SK_d, "IPPM") (RFC 7717 §5.1), then PBKDF2-HMAC-SHA1(Salt, Count,
    16) ("pbkdf2", our default reading) or its first 16 octets ("direct");
  * Server-Start: MBZ 15 | Accept 1 | Server-IV 16 | Start-Time 8 | MBZ 8; Accept 6 = no
    IKEv2 SA (RFC 7717 §5.3).

Directions: xwamp server <- this client, and this server <- xwamp client. One test per
row of issue 13's section-1 table (named in each docstring).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from agent.binder.keysource import IKEEntry, StaticIKEKeySource
from agent.binder.rfc7717 import RFC7717KeySource
from agent.control.client import ControlClient
from agent.control.keyring import ChainedKeySource, StaticKeySource
from agent.control.server import ControlServer, ServerConfig
from agent.control import events as ev
from agent.binder.ikev2 import PRF
from netlink.secret import Secret

ROOT = Path(__file__).resolve().parent.parent
TWAMP_BIT, OWAMP_BIT = 128, 16  # RFC 7717 §7 / RFC 7718
AUTH = 2
# SPIs ending in 0x00: a UTF-8/NUL-stripping reading of the KeyID would cut them
SPI_I, SPI_R = bytes.fromhex("8e5c3ae507221600"), bytes.fromhex("b1f201bb155c3a00")
SK_D = bytes(range(32))
LO = ipaddress.ip_address("127.0.0.1")
CONN_S, CONN_C = (LO, 862), (LO, 40000)


# --- the independent peer -------------------------------------------------------------------

def ippm_secret(sk_d: bytes, alg=hashes.SHA256) -> bytes:
    h = hmac.HMAC(sk_d, alg())
    h.update(b"IPPM")
    return h.finalize()


def token_key(sk_d: bytes, salt: bytes, count: int, kdf: str) -> bytes:
    secret = ippm_secret(sk_d)
    if kdf == "direct":
        return secret[:16]
    return PBKDF2HMAC(algorithm=hashes.SHA1(), length=16, salt=salt, iterations=count).derive(secret)


def aes_cbc(key: bytes, iv: bytes, data: bytes, decrypt: bool = False) -> bytes:
    c = Cipher(algorithms.AES(key), modes.CBC(iv))
    op = c.decryptor() if decrypt else c.encryptor()
    return op.update(data) + op.finalize()


def greeting(modes_: int, salt: bytes, count: int = 1024) -> tuple[bytes, bytes]:
    challenge = os.urandom(16)
    return struct.pack("!12sI16s16sI12s", bytes(12), modes_, challenge, salt, count, bytes(12)), challenge


def parse_greeting(b: bytes) -> dict:
    unused, modes_, challenge, salt, count, _ = struct.unpack("!12sI16s16sI12s", b)
    return {"unused": unused, "modes": modes_, "challenge": challenge, "salt": salt, "count": count}


def setup_response(mode: int, key_id: bytes, key: bytes, challenge: bytes) -> bytes:
    token = aes_cbc(key, bytes(16), challenge + os.urandom(48))
    return struct.pack("!I80s64s16s", mode, key_id, token, os.urandom(16))


def server_start_accept(b: bytes) -> int:
    return struct.unpack("!15sB16sQ8s", b[:48])[1]


def key_id(spi_i: bytes = SPI_I, spi_r: bytes = SPI_R, tail: bytes = bytes(64)) -> bytes:
    return spi_i + spi_r + tail


# --- xwamp's side ---------------------------------------------------------------------------

def ike(*, peers=(), spi_i=SPI_I, spi_r=SPI_R, sk_d=SK_D) -> StaticIKEKeySource:
    # No children: RFC 7717 §5.1 derives from the IKE SA "rather than the child SA"
    return StaticIKEKeySource([IKEEntry(spi_i, spi_r, PRF.HMAC_SHA2_256, Secret(sk_d),
                                        peers=tuple(ipaddress.ip_network(p) for p in peers))])


def xwamp_server(kdf: str = "pbkdf2", twamp: bool = True, source=None) -> ControlServer:
    ks = source or RFC7717KeySource(ike(), kdf)
    cfg = ServerConfig(count=1024, modes=1 | AUTH | 4 | TWAMP_BIT | OWAMP_BIT)
    return ControlServer(twamp, cfg, ks, local=CONN_S, peer=CONN_C)


def xwamp_client(wanted, source, twamp: bool = True) -> ControlClient:
    return ControlClient(twamp, wanted, "alice", source, max_count=1 << 16, local=CONN_C, peer=CONN_S)


KDFS = pytest.mark.parametrize("kdf", ["pbkdf2", "direct"])
PROTOS = pytest.mark.parametrize("twamp,bit", [(True, TWAMP_BIT), (False, OWAMP_BIT)])


# --- xwamp server <- independent client -------------------------------------------------------

@KDFS
@PROTOS
def test_server_reads_raw_spis_from_first_16_octets(kdf, twamp, bit) -> None:
    """Row 2 (§5.3): the server takes SPIi/SPIr from the first 16 KeyID octets, raw, and
    ignores the rest: binary SPIs ending in 0x00 and a non-zero tail still find the IKE SA."""
    srv = xwamp_server(kdf, twamp)
    g = parse_greeting(srv.data_to_send())
    key = token_key(SK_D, g["salt"], g["count"], kdf)
    evs = srv.receive_data(setup_response(AUTH | bit, key_id(tail=b"\xff" * 64), key, g["challenge"]))
    assert server_start_accept(srv.data_to_send()) == 0, evs
    assert isinstance(evs[-1], ev.SetupComplete) and not srv.closed


@PROTOS
def test_server_offers_bit_with_rfc4656_greeting(twamp, bit) -> None:
    """Row 3 (§5.2): the Modes bit alone signals support; Unused stays zero (no
    announcement) and Salt/Count are there as RFC 4656 lays them out. Row 4 (§5.1): the
    IKE entry has no CHILD_SA at all."""
    g = parse_greeting(xwamp_server(twamp=twamp).data_to_send())
    assert g["modes"] & bit and g["modes"] & AUTH
    assert g["unused"] == bytes(12) and g["count"] == 1024 and len(g["salt"]) == 16


def test_server_without_ike_source_does_not_offer_the_bit() -> None:
    srv = ControlServer(True, ServerConfig(count=1024, modes=1 | AUTH | TWAMP_BIT),
                        StaticKeySource({"alice": Secret(b"pw")}), local=CONN_S, peer=CONN_C)
    assert not parse_greeting(srv.data_to_send())["modes"] & TWAMP_BIT


@PROTOS
def test_server_answers_accept_6_for_unknown_spis(twamp, bit, caplog) -> None:
    """Row 6 (§5.3): no IKE SA for the KeyID's SPIs -> log it, Server-Start Accept = 6."""
    srv = xwamp_server(twamp=twamp)
    g = parse_greeting(srv.data_to_send())
    key = token_key(SK_D, g["salt"], g["count"], "pbkdf2")
    with caplog.at_level(logging.WARNING):
        srv.receive_data(setup_response(AUTH | bit, key_id(spi_r=os.urandom(8)), key, g["challenge"]))
    assert server_start_accept(srv.data_to_send()) == 6 and srv.closed
    assert any("no IKE SA" in r.getMessage() and "Accept=6" in r.getMessage() for r in caplog.records)
    assert SK_D.hex() not in caplog.text


def test_server_refuses_a_wrong_sk_d_with_accept_1() -> None:
    """Negative control: the derivation matters (a peer with another SK_d fails)."""
    srv = xwamp_server()
    g = parse_greeting(srv.data_to_send())
    key = token_key(b"\x01" * 32, g["salt"], g["count"], "pbkdf2")
    srv.receive_data(setup_response(AUTH | TWAMP_BIT, key_id(), key, g["challenge"]))
    assert server_start_accept(srv.data_to_send()) == 1


def test_server_passphrase_identities_unaffected_by_binary_keyids() -> None:
    """A binary KeyID in a passphrase mode is an unknown identity (Accept=1), not a crash."""
    srv = xwamp_server(source=ChainedKeySource(RFC7717KeySource(ike()), StaticKeySource({"alice": Secret(b"pw")})))
    g = parse_greeting(srv.data_to_send())
    srv.receive_data(setup_response(AUTH, b"\xff\xfe" + bytes(78), os.urandom(16), g["challenge"]))
    assert server_start_accept(srv.data_to_send()) == 1


# --- independent server <- xwamp client -------------------------------------------------------

def run_client_against_peer(cli: ControlClient, offered: int, kdf: str = "pbkdf2"):
    salt = os.urandom(16)
    g, challenge = greeting(offered, salt)
    evs = cli.receive_data(g)
    out = cli.data_to_send()
    return evs, out, salt, challenge


@KDFS
@PROTOS
def test_client_sends_spii_spir_and_selects_the_bit(kdf, twamp, bit) -> None:
    """Rows 1 and 5 (§5.3): seeing the bit the client selects it (Mode = auth | bit) and
    its KeyID is SPIi (8) | SPIr (8) | zeros; the Token opens under prf(SK_d, "IPPM").
    Row 3: the greeting's Unused is zero, as RFC 4656 has it."""
    cli = xwamp_client(["auth+rfc7717", "auth"], RFC7717KeySource(ike(peers=["127.0.0.0/8"]), kdf), twamp)
    _, out, salt, challenge = run_client_against_peer(cli, 1 | AUTH | 4 | bit, kdf)
    mode, kid, token, iv = struct.unpack("!I80s64s16s", out)
    assert mode == AUTH | bit
    assert kid[:8] == SPI_I and kid[8:16] == SPI_R and kid[16:] == bytes(64)
    plain = aes_cbc(token_key(SK_D, salt, 1024, kdf), bytes(16), token, decrypt=True)
    assert plain[:16] == challenge


def test_client_reports_accept_6() -> None:
    """Row 6, client side: Server-Start Accept = 6 is a clean refusal naming RFC 7717, not
    a protocol error."""
    cli = xwamp_client(["auth+rfc7717"], RFC7717KeySource(ike()))
    run_client_against_peer(cli, AUTH | TWAMP_BIT)
    evs = cli.receive_data(struct.pack("!15sB16sQ8s", bytes(15), 6, bytes(16), 0, bytes(8)))
    assert [type(e) for e in evs] == [ev.SetupRefused] and evs[0].accept == 6 and cli.closed
    from agent.control.aio import setup_refusal

    assert "RFC 7717" in setup_refusal(6, AUTH | TWAMP_BIT)


def test_client_falls_back_without_an_ike_sa(caplog) -> None:
    """Row 7 (§5.1): no IKE SA for this peer -> log an error and proceed with the RFC 4656
    modes (here auth with a passphrase) instead of closing."""
    src = ChainedKeySource(RFC7717KeySource(ike(peers=["192.0.2.0/24"])), StaticKeySource({"alice": Secret(b"pw")}))
    cli = xwamp_client(["auth+rfc7717", "auth"], src)
    with caplog.at_level(logging.ERROR):
        _, out, salt, challenge = run_client_against_peer(cli, 1 | AUTH | TWAMP_BIT)
    mode, kid, token, _ = struct.unpack("!I80s64s16s", out)
    assert mode == AUTH and kid.rstrip(b"\0") == b"alice"
    key = PBKDF2HMAC(algorithm=hashes.SHA1(), length=16, salt=salt, iterations=1024).derive(b"pw")
    assert aes_cbc(key, bytes(16), token, decrypt=True)[:16] == challenge
    assert any("falling back" in r.getMessage() and "7717" in r.getMessage() for r in caplog.records)


def test_client_picks_the_ike_sa_of_its_peer() -> None:
    """Several IKE SAs: the one whose peers reach the server's address keys the session."""
    other = IKEEntry(b"\x11" * 8, b"\x22" * 8, PRF.HMAC_SHA2_256, Secret(b"\x33" * 32),
                     peers=(ipaddress.ip_network("192.0.2.0/24"),))
    mine = IKEEntry(SPI_I, SPI_R, PRF.HMAC_SHA2_256, Secret(SK_D), peers=(ipaddress.ip_network("127.0.0.1/32"),))
    cli = xwamp_client(["auth+rfc7717"], RFC7717KeySource(StaticIKEKeySource([other, mine])))
    _, out, _, _ = run_client_against_peer(cli, AUTH | TWAMP_BIT)
    assert out[4:20] == SPI_I + SPI_R


# --- xwamp <-> xwamp, and the CLI: on by default with --ike-keys (row 8, §1) ----------------

def test_rfc7717_kdf_config_checked() -> None:
    with pytest.raises(ValueError):
        RFC7717KeySource(ike(), "sha1")  # type: ignore[arg-type]


def test_with_rfc7717_puts_the_ike_key_first() -> None:
    from agent.binder.rfc7717 import with_rfc7717

    assert with_rfc7717(("unauth",), passphrase=False) == ("auth+rfc7717", "unauth")
    assert with_rfc7717(("enc", "auth"), passphrase=True) == ("enc+rfc7717", "enc", "auth+rfc7717", "auth")
    assert with_rfc7717(("auth+ipsec-bound",), passphrase=False) == ("auth+ipsec-bound",)


def _ike_file(tmp_path: Path, peers=("127.0.0.1",)) -> Path:
    f = tmp_path / "ike.json"
    f.write_text(json.dumps({"version": 1, "ike_sas": [
        {"spi_i": SPI_I.hex(), "spi_r": SPI_R.hex(), "prf": "hmac-sha256", "sk_d": SK_D.hex(), "peers": list(peers)}]}))
    f.chmod(0o600)
    return f


def test_cli_ike_keys_on_by_default(tmp_path) -> None:
    """Row 8 (§1: "SHOULD be used instead of shared secrets"): `xwamp server --ike-keys`
    offers RFC 7717 and `xwamp ping/owping --ike-keys` select it with no --mode at all."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    ikef = _ike_file(tmp_path)
    srv = subprocess.Popen([sys.executable, "-m", "agent", "server", "--listen", "127.0.0.1", "--twamp-port", "0",
                            "--owamp-port", "0", "--ike-keys", str(ikef), "--count", "1024", "--duration", "60"],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        ports, banners = {}, {}
        while len(ports) < 2:
            line = srv.stdout.readline()
            assert line, srv.stderr.read() if srv.stderr else ""
            proto, port = line.split()[2], int(line.split(" port ")[1].split(",")[0])
            ports[proto], banners[proto] = port, line
        assert "rfc7717" in banners["TWAMP"] and "rfc7717" in banners["OWAMP"]

        def cli(*args: str) -> dict:
            r = subprocess.run([sys.executable, "-m", "agent", *args, "--ike-keys", str(ikef),
                                "-c", "3", "-i", "0.01", "--wait", "0.5", "--json"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return json.loads(r.stdout)

        doc = cli("ping", "127.0.0.1", "--port", str(ports["TWAMP"]))
        assert doc["mode"] == "auth+rfc7717" and doc["summary"]["loss"]["received"] == 3
        doc = cli("owping", "127.0.0.1", "--port", str(ports["OWAMP"]), "--mode", "enc")
        assert doc["mode"] == "enc+rfc7717" and doc["forward"]["received"] == 3 and doc["reverse"]["received"] == 3
        # a client whose file holds another IKE SA for this peer: the server answers Accept=6
        other = tmp_path / "other.json"
        other.write_text(ikef.read_text().replace(SPI_R.hex(), "00" * 8))
        other.chmod(0o600)
        r = subprocess.run([sys.executable, "-m", "agent", "ping", "127.0.0.1", "--port", str(ports["TWAMP"]),
                            "--ike-keys", str(other), "-c", "1"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 1 and "no IKEv2 SA" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        srv.terminate()
        srv.wait(10)


# --- the agent: agent.ike_keys turns RFC 7717 on ----------------------------------------------

def test_agent_config_ike_keys_turns_rfc7717_on(tmp_path) -> None:
    from agent.daemon import config as cfg

    ikef = _ike_file(tmp_path)
    c = cfg.parse({"agent": {"ike_keys": str(ikef)}, "peers": [{"address": "127.0.0.1"}]}, "x.toml")
    assert c.agent.rfc7717_on and c.agent.rfc7717_kdf == "pbkdf2"
    assert "auth+rfc7717" in c.server.modes and "enc+rfc7717" in c.server.modes
    assert c.peers[0].session.modes == ("auth+rfc7717", "unauth")
    off = cfg.parse({"agent": {"ike_keys": str(ikef), "rfc7717": False}, "peers": [{"address": "127.0.0.1"}]}, "x")
    assert off.peers[0].session.modes == ("unauth",) and not any("rfc7717" in m for m in off.server.modes)
    with pytest.raises(cfg.ConfigError, match="needs agent.ike_keys"):
        cfg.parse({"peers": [{"address": "127.0.0.1", "mode": "auth+rfc7717"}]}, "x")
    ikef.chmod(0o644)
    with pytest.raises(cfg.ConfigError, match="agent.ike_keys: .*chmod 600"):
        cfg.parse({"agent": {"ike_keys": str(ikef)}}, "x")


@pytest.mark.parametrize("where", ["agent", "server"])
def test_old_rfc7717_unverified_name_is_one_clear_error(where) -> None:
    from agent.daemon import config as cfg

    with pytest.raises(cfg.ConfigError) as ei:
        cfg.parse({where: {"rfc7717_unverified": True}}, "x.toml")
    assert str(ei.value).startswith(f"x.toml: {where}.rfc7717_unverified: renamed:") and "agent.ike_keys" in str(ei.value)
    assert "\n" not in str(ei.value)


def test_agent_server_and_sessions_key_from_ike_file(tmp_path) -> None:
    """`xwamp agent` with agent.ike_keys: its server offers RFC 7717 and an xwamp client
    keyed from the same file selects it (both ends from one config, loopback)."""
    import asyncio

    from agent.control.aio import AsyncControlClient
    from agent.daemon import config as cfg
    from agent.daemon.servers import ControlServers

    ikef = _ike_file(tmp_path)
    import dataclasses

    c = cfg.parse({"agent": {"ike_keys": str(ikef)}, "server": {"listen": ["127.0.0.1"], "owamp": False}}, "x")
    c = dataclasses.replace(c, server=dataclasses.replace(c.server, twamp_port=0))  # any free port

    class FakeDaemon:
        runtime = None
        config = c
        rfc7717_keys = RFC7717KeySource(__import__("agent.binder.keysource", fromlist=["x"]).FileIKEKeySource(ikef))

    async def main() -> int:
        servers = ControlServers(c.server, FakeDaemon())  # type: ignore[arg-type]
        await servers.start()
        try:
            port = servers.listeners[0].addresses[0][1]
            cli = await AsyncControlClient.connect("127.0.0.1", port, wanted=["auth+rfc7717"],
                                                   key_source=FakeDaemon.rfc7717_keys, timeout=20)
            mode = cli.cli.mode
            await cli.close()
            return mode
        finally:
            await servers.stop()

    assert asyncio.run(main()) == AUTH | TWAMP_BIT


def test_charon_keys_records_peers_for_the_client() -> None:
    """tools/lab/charon-keys puts the far IKE address and the remote traffic selectors in
    each IKE SA's `peers`, so a client with several IKE SAs picks its server's."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("charon_keys", str(ROOT / "tools" / "lab" / "charon-keys"))
    spec = importlib.util.spec_from_loader("charon_keys", loader)
    ck = importlib.util.module_from_spec(spec)
    loader.exec_module(ck)
    sas = ck.parse_list_sas(
        "xwamp: #2, ESTABLISHED, IKEv2, 8e5c3ae507221684_i* b1f201bb155c3acd_r\n"
        "  local  '192.0.2.1' @ 192.0.2.1[500]\n"
        "  remote '192.0.2.2' @ 192.0.2.2[4500]\n"
        "  AES_CBC-128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048\n"
        "  xwamp: #1, reqid 1, INSTALLED, TUNNEL, ESP:AES_CBC-128/HMAC_SHA2_256_128\n"
        "    in  c1234567,      0 bytes,     0 packets\n"
        "    local  10.77.1.1/32\n"
        "    remote 10.77.2.0/24 fd77:2::/64\n")
    doc = ck.build({2: {"sk_d": SK_D, "children": []}}, sas)
    from agent.binder.keysource import StaticIKEKeySource, parse_entries

    src = StaticIKEKeySource(parse_entries(doc))
    assert doc["ike_sas"][0]["peers"] == ["192.0.2.2", "10.77.2.0/24", "fd77:2::/64"]
    assert src.for_peer("10.77.2.1").spi_i.hex() == "8e5c3ae507221684"
    assert src.for_peer("fd77:2::1") is not None and src.for_peer("10.77.3.1") is None


def test_charon_keys_follows_an_ike_rekey() -> None:
    """charon derives the successor IKE_SA's keys while logging under the old one, then says
    "IKE_SA xwamp[2] rekeyed between ...": the second SK_d dump belongs to IKE_SA #2."""
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("charon_keys", str(ROOT / "tools" / "lab" / "charon-keys"))
    spec = importlib.util.spec_from_loader("charon_keys", loader)
    ck = importlib.util.module_from_spec(spec)
    loader.exec_module(ck)

    def dump(uid, label, data):
        out = [f"04[IKE] <xwamp|{uid}> {label} => {len(data)} bytes @ 0x7f0000001000"]
        for off in range(0, len(data), 16):
            chunk = data[off:off + 16]
            out.append(f"04[IKE] <xwamp|{uid}> {off:4d}: {' '.join(f'{b:02X}' for b in chunk).ljust(47)}  ....")
        return out

    old_d, new_d = bytes(range(32)), bytes(range(100, 132))
    log = [*dump(1, "Sk_d secret", old_d), *dump(1, "Sk_d secret", new_d),
           "04[IKE] <xwamp|1> IKE_SA xwamp[2] rekeyed between 192.0.2.1[a]...192.0.2.2[b]"]
    ikes = ck.parse_keylog(log)
    assert ikes[1]["sk_d"] == old_d and ikes[2]["sk_d"] == new_d
