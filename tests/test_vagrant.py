"""Host checks for the Vagrant lab and the provisioning it shares with the QEMU lab:
the Vagrantfile parses and validates (offline, no box), the scripts pass shellcheck,
and the renderers are idempotent (a re-provision changes nothing) and mirror the
two nodes. Nothing here boots a VM or starts charon."""

import importlib.machinery
import importlib.util
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VAGRANT = REPO / "vagrant"
LAB = REPO / "lab"
SCRIPTS = sorted([*LAB.glob("*.sh"), *(VAGRANT / "provision").glob("*.sh"),
                  REPO / "tools/lab/strongswan.sh", REPO / "tools/lab/agents.sh",
                  *(p for p in (REPO / "tools/lab/vagrant").iterdir() if p.is_file())])

NODE_A = {"XW_NAME": "a", "XW_PEER": "b", "XW_LOCAL_OUTER": "192.0.2.1", "XW_REMOTE_OUTER": "192.0.2.2",
          "XW_LOCAL_INNER": "10.77.1.1", "XW_REMOTE_INNER": "10.77.2.1"}
NODE_B = {"XW_NAME": "b", "XW_PEER": "a", "XW_LOCAL_OUTER": "192.0.2.2", "XW_REMOTE_OUTER": "192.0.2.1",
          "XW_LOCAL_INNER": "10.77.2.1", "XW_REMOTE_INNER": "10.77.1.1"}


def run(argv, env=None, **kw):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=kw.pop("timeout", 120), **kw)
    assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


# ----------------------------------------------------------------- Vagrantfile


def test_vagrantfile_ruby_syntax():
    if not shutil.which("ruby"):
        pytest.skip("ruby missing (apt-get install ruby)")
    assert "Syntax OK" in run(["ruby", "-c", VAGRANT / "Vagrantfile"])


def _vagrant_env(tmp_path, **extra):
    # Keep vagrant's state out of the checkout and the user's home.
    return {"VAGRANT_CWD": str(VAGRANT), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
            "VAGRANT_HOME": str(tmp_path / "home"), "VAGRANT_CHECKPOINT_DISABLE": "1", **extra}


def test_vagrant_validate_offline(tmp_path):
    """`vagrant validate` loads the Vagrantfile for real (no box, no network, no hypervisor)
    and must not make the lab's secrets: those are made at `vagrant up` only."""
    if not shutil.which("vagrant"):
        pytest.skip("vagrant missing (apt-get install vagrant)")
    secrets_before = (VAGRANT / ".secrets").exists()
    out = run(["vagrant", "validate", "--ignore-provider"], env=_vagrant_env(tmp_path), timeout=300)
    assert "validated successfully" in out
    out = run(["vagrant", "validate", "--ignore-provider"],
              env=_vagrant_env(tmp_path, XWAMP_LAB_AUTH="cert"), timeout=300)
    assert "validated successfully" in out
    assert (VAGRANT / ".secrets").exists() == secrets_before


def test_vagrant_validate_libvirt_provider(tmp_path):
    """With the vagrant-libvirt plugin (Debian package), the libvirt provider block is validated too."""
    if not shutil.which("vagrant"):
        pytest.skip("vagrant missing (apt-get install vagrant)")
    r = subprocess.run(["vagrant", "validate"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **_vagrant_env(tmp_path, VAGRANT_DEFAULT_PROVIDER="libvirt")})
    if "could not be found" in r.stdout + r.stderr:
        pytest.skip("the vagrant-libvirt plugin is not installed (apt-get install vagrant-libvirt)")
    assert r.returncode == 0, r.stdout + r.stderr


def test_vagrantfile_wiring():
    """Both providers, the Debian 12 box, and a provisioner whose scripts exist and run."""
    text = (VAGRANT / "Vagrantfile").read_text()
    assert 'BOX = ENV.fetch("XWAMP_LAB_BOX", "debian/bookworm64")' in text and "config.vm.box = BOX" in text
    assert 'provider "libvirt"' in text and 'provider "virtualbox"' in text
    assert "vagrant/provision/node.sh" in text
    node = (VAGRANT / "provision" / "node.sh").read_text()
    for step in re.findall(r'"\$here/([\w-]+\.sh)"', node):
        p = VAGRANT / "provision" / step
        assert p.exists() and os.access(p, os.X_OK), step
    for unit in ("xwamp-charon.service", "xwamp-lab-net.service"):
        assert (VAGRANT / "provision" / unit).exists()
    ignored = (VAGRANT / ".gitignore").read_text()
    assert "/.secrets/" in ignored  # credentials are made at `vagrant up`, never committed


def test_machine_names_cannot_be_read_as_hex():
    """Vagrant 2.3 takes a machine name that is valid hex as a prefix of a machine-index
    ID (hashicorp/vagrant#8152): `vagrant ssh a` ran on b. Names must not be hex."""
    text = (VAGRANT / "Vagrantfile").read_text()
    names = re.findall(r'^\s*"([\w-]+)" => \{ peer:', text, re.M)
    assert len(names) == 2
    for n in names:
        assert not re.fullmatch(r"[0-9a-fA-F]+", n), n


def test_one_side_initiates_ike():
    """Both routers initiating at once leaves two IKE/CHILD SA pairs: one initiator only."""
    text = (VAGRANT / "Vagrantfile").read_text()
    assert re.search(r'^INITIATOR = "router-a"$', text, re.M)
    assert '"XW_INITIATOR" => name == INITIATOR ? "1" : "0"' in text
    ipsec = (VAGRANT / "provision" / "ipsec.sh").read_text()
    assert "start_action=none" in ipsec and '[ "$initiator" = 1 ] && start_action="trap"' in ipsec
    assert 'if [ "$initiator" = 1 ] && ! swanctl' in ipsec


def test_agent_unit_runs_from_the_venv_as_its_own_user():
    """The packaged unit names /usr/bin/xwamp in ExecStartPre and ExecStart, and User=xwamp:
    the lab's drop-in must reset both Exec lines (else 203/EXEC) and the user must exist
    before the unit starts (else 217/USER)."""
    unit = (REPO / "packaging" / "xwamp.service").read_text()
    execs = re.findall(r"^(ExecStart\w*)=/usr/bin/xwamp", unit, re.M)
    agent = (VAGRANT / "provision" / "agent.sh").read_text()
    for e in execs:
        assert f'"{e}=" "{e}=$venv/bin/xwamp' in agent, e
    assert "packaging/xwamp.sysusers.conf" in agent and "systemd-sysusers" in agent
    assert "packaging/xwamp.tmpfiles.conf" in agent and "systemd-tmpfiles --create" in agent


# ----------------------------------------------------------------- shell


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script):
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck missing (apt-get install shellcheck)")
    run(["shellcheck", "-x", script], cwd=REPO)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_are_strict(script):
    text = script.read_text()
    if script.name == "lib.sh":
        assert "sourced" in text
        return
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text


# ----------------------------------------------------------------- renderers


def _render(tmp_path, node, out, **extra):
    return run([LAB / "render.sh", out], env={**node, "XW_SECRETS": str(tmp_path / "secrets"), **extra})


def test_secrets_made_once(tmp_path):
    sec = tmp_path / "secrets"
    assert "made:" in run([LAB / "secrets.sh", sec])
    psk = (sec / "psk").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", psk)
    assert stat.S_IMODE(sec.stat().st_mode) == 0o700 and stat.S_IMODE((sec / "psk").stat().st_mode) == 0o600
    assert run([LAB / "secrets.sh", sec]) == ""  # idempotent: nothing made, PSK kept
    assert (sec / "psk").read_text() == psk


def test_certificates_made_once(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl missing")
    sec = tmp_path / "secrets"
    run([LAB / "secrets.sh", sec, "--cert", "a", "b"])
    for n in ("a", "b"):
        run(["openssl", "verify", "-CAfile", sec / "ca.crt", sec / f"{n}.crt"])
        san = run(["openssl", "x509", "-in", sec / f"{n}.crt", "-noout", "-ext", "subjectAltName"])
        assert f"DNS:{n}.xwamp.lab" in san
        assert stat.S_IMODE((sec / f"{n}.key").stat().st_mode) == 0o600
    before = {p.name: p.read_bytes() for p in sec.iterdir()}
    assert run([LAB / "secrets.sh", sec, "--cert", "a", "b"]) == ""
    assert {p.name: p.read_bytes() for p in sec.iterdir()} == before


def test_render_is_idempotent_and_reports_changes(tmp_path):
    run([LAB / "secrets.sh", tmp_path / "secrets"])
    out = tmp_path / "a"
    first = _render(tmp_path, NODE_A, out)
    assert f"changed: {out}/strongswan.conf" in first and f"changed: {out}/swanctl/swanctl.conf" in first
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert _render(tmp_path, NODE_A, out) == ""  # a re-provision changes nothing
    assert {p: p.read_bytes() for p in files} == files and {p: p.stat().st_mtime_ns for p in files} == mtimes
    # One changed input replaces exactly the file it affects.
    changed = _render(tmp_path, {**NODE_A, "XW_REMOTE_OUTER": "192.0.2.9"}, out)
    assert changed.strip() == f"changed: {out}/swanctl/swanctl.conf"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for p in (out / "strongswan.conf", out / "swanctl" / "swanctl.conf"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600  # the PSK lives here


def test_render_psk_nodes_mirror(tmp_path):
    run([LAB / "secrets.sh", tmp_path / "secrets"])
    psk = (tmp_path / "secrets" / "psk").read_text().strip()
    _render(tmp_path, NODE_A, tmp_path / "a")
    _render(tmp_path, NODE_B, tmp_path / "b")
    a = (tmp_path / "a" / "swanctl" / "swanctl.conf").read_text()
    b = (tmp_path / "b" / "swanctl" / "swanctl.conf").read_text()

    def field(text, key):
        return re.findall(rf"^\s*{key} = (.*)$", text, re.M)

    assert field(a, "local_addrs") == field(b, "remote_addrs") == ["192.0.2.1"]
    assert field(a, "local_ts") == field(b, "remote_ts") == ["10.77.1.1/32"]
    assert field(a, "id") == ["a.xwamp.lab", "b.xwamp.lab"] and field(b, "id") == ["b.xwamp.lab", "a.xwamp.lab"]
    assert field(a, "auth") == ["psk", "psk"] and field(a, "secret") == [f"0x{psk}"] == field(b, "secret")
    assert field(a, "esp_proposals") == ["aes128-sha256"]  # no PFS: KEYMAT stays rebuildable from SK_d
    assert "@" not in a.replace("@ ", "")  # every placeholder filled
    conf = (tmp_path / "a" / "strongswan.conf").read_text()
    assert f"socket = unix://{tmp_path}/a/charon.vici" in conf
    assert "keys {" not in conf  # no key log unless asked


def test_render_certificates_and_key_log(tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl missing")
    run([LAB / "secrets.sh", tmp_path / "secrets", "--cert", "a", "b"])
    out = tmp_path / "a"
    _render(tmp_path, NODE_A, out, XW_AUTH="cert", XW_KEYLOG=str(tmp_path / "keys.log"),
            XW_START_ACTION="trap", XW_VICI="unix:///run/x.vici")
    sw = (out / "swanctl" / "swanctl.conf").read_text()
    assert re.findall(r"^\s*auth = (.*)$", sw, re.M) == ["pubkey", "pubkey"]
    assert "certs = a.crt" in sw and "start_action = trap" in sw and "secret =" not in sw
    assert (out / "swanctl" / "x509ca" / "ca.crt").exists() and (out / "swanctl" / "x509" / "a.crt").exists()
    assert stat.S_IMODE((out / "swanctl" / "private" / "a.key").stat().st_mode) == 0o600
    assert not (out / "swanctl" / "x509" / "b.crt").exists()  # the peer's cert comes in IKE_AUTH
    conf = (out / "strongswan.conf").read_text()
    assert f"path = {tmp_path}/keys.log" in conf and "ike = 4" in conf and "socket = unix:///run/x.vici" in conf
    assert _render(tmp_path, NODE_A, out, XW_AUTH="cert", XW_KEYLOG=str(tmp_path / "keys.log"),
                   XW_START_ACTION="trap", XW_VICI="unix:///run/x.vici") == ""


def test_render_refuses_bad_input(tmp_path):
    r = subprocess.run([LAB / "render.sh", tmp_path / "a"], capture_output=True, text=True,
                       env={**os.environ, **NODE_A, "XW_SECRETS": str(tmp_path), "XW_AUTH": "magic"})
    assert r.returncode == 2 and "psk or cert" in r.stderr
    r = subprocess.run([LAB / "render.sh", tmp_path / "a"], capture_output=True, text=True,
                       env={**os.environ, **NODE_A, "XW_SECRETS": str(tmp_path / "none")})
    assert r.returncode == 2 and "psk missing" in r.stderr


def test_agent_config_renders_idempotently(tmp_path):
    out = tmp_path / "xwamp.toml"
    env = {**NODE_A, "XW_NETNS": "xs-a"}
    assert run([LAB / "render-agent.sh", out], env=env).strip() == f"changed: {out}"
    assert run([LAB / "render-agent.sh", out], env=env) == ""
    text = out.read_text()
    assert 'netns = "xs-a"' in text and 'listen = "10.77.1.1"' in text and 'address = "10.77.2.1"' in text
    try:
        from agent.daemon import config
    except ImportError:  # the daemon's configuration module has not landed in this checkout
        return
    conf = config.load(out)
    assert conf.agent.netns == "xs-a" and str(conf.peers[0].address) == "10.77.2.1"
    assert str(conf.peers[0].source) == "10.77.1.1" and conf.exporter.listen == "10.77.1.1"


def test_prometheus_config_renders_idempotently(tmp_path):
    conf = tmp_path / "prometheus.yml"
    env = {"XWAMP_REPO": str(REPO), "XW_SCRAPE": "a=10.77.1.1 b=10.77.2.1",
           "XW_PROMETHEUS_CONF": str(conf), "XW_RENDER_ONLY": "1"}
    assert "changed:" in run([VAGRANT / "provision" / "prometheus.sh"], env=env)
    assert run([VAGRANT / "provision" / "prometheus.sh"], env=env) == ""
    text = conf.read_text()
    assert '["10.77.1.1:9862"]' in text and '["10.77.2.1:9862"]' in text and "@" not in text
    try:
        import yaml
    except ImportError:
        return
    doc = yaml.safe_load(text)
    targets = [t for sc in doc["scrape_configs"] for s in sc["static_configs"] for t in s["targets"]]
    assert targets == ["10.77.1.1:9862", "10.77.2.1:9862"]


# ----------------------------------------------------------------- charon-keys


def _charon_keys():
    path = REPO / "tools" / "lab" / "charon-keys"
    loader = importlib.machinery.SourceFileLoader("charon_keys", str(path))
    spec = importlib.util.spec_from_loader("charon_keys", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _dump(thread, group, uid, label, data: bytes):
    """charon's %B hex dump layout: a header, then 16 octets a line with an ASCII column."""
    lines = [f"{thread}[{group}] <xwamp|{uid}> {label} => {len(data)} bytes @ 0x7f0000001000"]
    for off in range(0, len(data), 16):
        chunk = data[off:off + 16]
        hexpart = " ".join(f"{b:02X}" for b in chunk).ljust(47)
        asc = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{thread}[{group}] <xwamp|{uid}> {off:4d}: {hexpart}  {asc}")
    return lines


def test_charon_keys_builds_the_key_source_file(tmp_path):
    ck = _charon_keys()
    sk_d, seed0, seed1 = bytes(range(32)), bytes(range(64, 128)), bytes(range(128, 192))
    log = [
        "05[IKE] <xwamp|1> initiating IKE_SA xwamp[1] to 192.0.2.2",
        *_dump("04", "IKE", 1, "SKEYSEED", b"\x11" * 32),
        *_dump("04", "IKE", 1, "Sk_d secret", sk_d),
        *_dump("09", "CHD", 1, "seed", seed0)[:3],  # interleaved with another thread's line
        "07[IKE] <xwamp|1> something else",
        *_dump("09", "CHD", 1, "seed", seed0)[3:],
        "09[IKE] <xwamp|1> CHILD_SA xwamp{1} established with SPIs c0000001_i c0000002_o and TS ...",
        *_dump("11", "CHD", 1, "seed", seed1),
        "11[IKE] <xwamp|1> inbound CHILD_SA xwamp{2} established with SPIs c0000003_i c0000004_o and TS ...",
        "11[IKE] <xwamp|1> outbound CHILD_SA xwamp{2} established with SPIs c0000003_i c0000004_o and TS ...",
        *_dump("12", "CHD", 1, "seed", b"\x22" * 320),  # PFS: g^ir | Ni | Nr, not expressible
        "12[IKE] <xwamp|1> CHILD_SA xwamp{3} established with SPIs c0000005_i c0000006_o and TS ...",
    ]
    (tmp_path / "keys.log").write_text("\n".join(log) + "\n")
    (tmp_path / "sas.txt").write_text(
        "xwamp: #1, ESTABLISHED, IKEv2, 0102030405060708_i* 1112131415161718_r\n"
        "  local  'a.xwamp.lab' @ 192.0.2.1[500]\n"
        "  AES_CBC-128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048\n"
        "  xwamp: #2, reqid 1, INSTALLED, TUNNEL, ESP:AES_CBC-128/HMAC_SHA2_256_128\n"
        "    in  c0000003,      0 bytes,     0 packets\n"
        "    out c0000004,      0 bytes,     0 packets\n")
    out = tmp_path / "ike-keys.json"
    assert ck.main(["charon-keys", str(tmp_path / "keys.log"), str(tmp_path / "sas.txt"), str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    from agent.binder.keysource import FileIKEKeySource

    src = FileIKEKeySource(out)
    first = src.by_child_spis(0xC0000002, 0xC0000001)
    assert first is not None and first.sk_d.reveal() == sk_d
    assert first.ike.spi_i == bytes.fromhex("0102030405060708") and first.ike.skeyseed.reveal() == b"\x11" * 32
    assert first.child.ni == seed0[:32] and first.child.nr == seed0[32:]
    second = src.by_reqid(1)
    assert second is not None and second.child.ni == seed1[:32] and second.child.nr == seed1[32:]
    assert src.by_child_spis(0xC0000005, 0xC0000006) is None  # the PFS child is left out
