#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Render one lab node's strongSwan configuration (strongswan.conf and a swanctl
# tree) from lab/strongswan/*.in. Shared by both harnesses: tools/lab/strongswan.sh
# (two netns in the QEMU VM) and vagrant/provision/ipsec.sh (two Debian VMs).
#
#   lab/render.sh OUTDIR   with the node described by environment variables:
#     XW_NAME          a | b (the identity is NAME.xwamp.lab)
#     XW_PEER          the other node's name
#     XW_LOCAL_OUTER   XW_REMOTE_OUTER   wire (IKE/ESP) addresses
#     XW_LOCAL_INNER   XW_REMOTE_INNER   measured addresses (tunnel /32 selectors)
#     XW_SECRETS       directory holding psk (hex) and, for certs, the pki.sh output
#     XW_AUTH          psk (default) | cert
#     XW_VICI          vici URI (default unix://OUTDIR/charon.vici)
#     XW_LOG           charon log (default OUTDIR/charon.log)
#     XW_KEYLOG        if set, also log key material there (lab only, see keylog.block.in)
#     XW_START_ACTION  none (default: the harness initiates) | start | trap
#     XW_IKE_PROPOSALS XW_ESP_PROPOSALS
#
# Idempotent: a file is only replaced when its content changes, and each
# replaced file is named on stdout, so provisioning can reload only on change
# and re-running it changes nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tpl=$here/strongswan
# shellcheck source=lib.sh
. "$here/lib.sh"
out=${1:?usage: lab/render.sh OUTDIR}
: "${XW_NAME:?}" "${XW_PEER:?}" "${XW_LOCAL_OUTER:?}" "${XW_REMOTE_OUTER:?}"
: "${XW_LOCAL_INNER:?}" "${XW_REMOTE_INNER:?}" "${XW_SECRETS:?}"
auth=${XW_AUTH:-psk}
case $auth in psk|cert) ;; *) echo "render.sh: XW_AUTH must be psk or cert, not '$auth'" >&2; exit 2;; esac

# All of swanctl's credential directories, so --load-all has nothing to complain about.
# (one mkdir: every process start costs ~0.1 s in the QEMU guest)
mkdir -p "$out"/swanctl/{x509,x509ca,x509ocsp,x509aa,x509ac,x509crl,pubkey,private,rsa,ecdsa,bliss,pkcs8,pkcs12}
# The rendered tree holds the PSK or a private key: nobody else reads it.
chmod 700 "$out" "$out/swanctl"

keylog_block=""
if [ -n "${XW_KEYLOG:-}" ]; then
    keylog_block=$(subst "$tpl/keylog.block.in" KEYLOG="$XW_KEYLOG")
fi
subst "$tpl/strongswan.conf.in" \
    VICI="${XW_VICI:-unix://$out/charon.vici}" \
    LOG="${XW_LOG:-$out/charon.log}" \
    KEYLOG_BLOCK="$keylog_block" > "$out/strongswan.conf.new"
install_if_changed "$out/strongswan.conf.new" "$out/strongswan.conf" 600

local_id=$XW_NAME.xwamp.lab
remote_id=$XW_PEER.xwamp.lab
if [ "$auth" = psk ]; then
    [ -s "$XW_SECRETS/psk" ] || { echo "render.sh: $XW_SECRETS/psk missing (lab/secrets.sh makes it)" >&2; exit 2; }
    psk=$(tr -d ' \n' < "$XW_SECRETS/psk")
    local_cert=""
    secrets="    ike-xwamp {
        id-local = $local_id
        id-remote = $remote_id
        secret = 0x$psk
    }"
    swauth=psk
else
    for f in ca.crt "$XW_NAME.crt" "$XW_NAME.key"; do
        [ -s "$XW_SECRETS/$f" ] || { echo "render.sh: $XW_SECRETS/$f missing (lab/secrets.sh --cert makes it)" >&2; exit 2; }
    done
    # swanctl --load-all picks these up from their conventional directories.
    cp "$XW_SECRETS/ca.crt" "$out/swanctl/x509ca/ca.crt.new"
    install_if_changed "$out/swanctl/x509ca/ca.crt.new" "$out/swanctl/x509ca/ca.crt" 644
    cp "$XW_SECRETS/$XW_NAME.crt" "$out/swanctl/x509/$XW_NAME.crt.new"
    install_if_changed "$out/swanctl/x509/$XW_NAME.crt.new" "$out/swanctl/x509/$XW_NAME.crt" 644
    cp "$XW_SECRETS/$XW_NAME.key" "$out/swanctl/private/$XW_NAME.key.new"
    install_if_changed "$out/swanctl/private/$XW_NAME.key.new" "$out/swanctl/private/$XW_NAME.key" 600
    local_cert="            certs = $XW_NAME.crt"
    secrets="    # the private key is loaded from swanctl/private/"
    swauth=pubkey
fi

subst "$tpl/swanctl.conf.in" \
    NAME="$XW_NAME" LOCAL_ID="$local_id" REMOTE_ID="$remote_id" AUTH="$swauth" \
    LOCAL_CERT="$local_cert" SECRETS="$secrets" \
    LOCAL_OUTER="$XW_LOCAL_OUTER" REMOTE_OUTER="$XW_REMOTE_OUTER" \
    LOCAL_INNER="$XW_LOCAL_INNER" REMOTE_INNER="$XW_REMOTE_INNER" \
    IKE_PROPOSALS="${XW_IKE_PROPOSALS:-aes128-sha256-modp2048}" \
    ESP_PROPOSALS="${XW_ESP_PROPOSALS:-aes128-sha256}" \
    START_ACTION="${XW_START_ACTION:-none}" > "$out/swanctl/swanctl.conf.new"
install_if_changed "$out/swanctl/swanctl.conf.new" "$out/swanctl/swanctl.conf" 600
