#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The node's IPsec: inner address, strongSwan configuration rendered by the
# shared lab/render.sh (the QEMU harness renders with the same script and
# templates), and the charon service. Re-running with the same inputs changes
# nothing; a changed input reloads the connection (swanctl --load-all) without
# restarting charon.
set -euo pipefail
repo=${XWAMP_REPO:-/xwamp}
here=$repo/vagrant/provision
# shellcheck source=lib.sh
. "$here/lib.sh"
: "${XW_NAME:?}" "${XW_PEER:?}" "${XW_LOCAL_OUTER:?}" "${XW_REMOTE_OUTER:?}"
: "${XW_LOCAL_INNER:?}" "${XW_REMOTE_INNER:?}"
conf=/etc/xwamp-lab
secrets=$repo/vagrant/.secrets
[ -s "$secrets/psk" ] || {
    echo "ipsec.sh: $secrets/psk missing: run 'vagrant up' or 'vagrant provision' from the host" \
         "(the Vagrantfile's trigger makes the secrets there, then rsync copies them)" >&2
    exit 1
}
install -d -m 0700 "$conf"

# 1. Inner address and route, now and at every boot.
tmp=$(mktemp)
printf 'XW_LOCAL_OUTER=%s\nXW_LOCAL_INNER=%s\nXW_REMOTE_INNER=%s\n' \
    "$XW_LOCAL_OUTER" "$XW_LOCAL_INNER" "$XW_REMOTE_INNER" > "$tmp"
net_changed=no
put_file "$tmp" "$conf/net.env" 0644 && net_changed=yes
put_file "$here/xwamp-lab-net.service" /etc/systemd/system/xwamp-lab-net.service 0644 && net_changed=yes
put_file "$here/xwamp-charon.service" /etc/systemd/system/xwamp-charon.service 0644 && net_changed=yes
rm -f "$tmp"
[ $net_changed = yes ] && systemctl daemon-reload
if [ $net_changed = yes ] && systemctl is-active --quiet xwamp-lab-net.service; then
    systemctl restart xwamp-lab-net.service
fi
enable_start xwamp-lab-net.service

# 2. strongSwan configuration: the shared renderer. Only the initiator (router-a)
# traps and initiates: when both sides initiate at once (a parallel `vagrant up`),
# two IKE/CHILD SA pairs come up and only one carries traffic.
initiator=${XW_INITIATOR:-0}
start_action=none
[ "$initiator" = 1 ] && start_action="trap"
changes=$(XW_SECRETS=$secrets XW_VICI=unix:///run/xwamp-lab/charon.vici \
          XW_LOG=/var/log/xwamp-lab/charon.log XW_START_ACTION=$start_action \
          "$repo/lab/render.sh" "$conf")
[ -n "$changes" ] && echo "$changes"

# 3. charon: start it, or reload the connection when the configuration changed.
if systemctl is-active --quiet xwamp-charon.service; then
    if [ -n "$changes" ]; then
        # strongswan.conf (plugins, logging) needs a restart; swanctl.conf a reload.
        if grep -q "strongswan.conf" <<<"$changes"; then
            systemctl restart xwamp-charon.service
        else
            systemctl reload xwamp-charon.service
        fi
    fi
fi
enable_start xwamp-charon.service

# 4. The initiator tries to bring the tunnel up now (the peer may not be up yet:
# trap will do it later). The responder waits.
export STRONGSWAN_CONF=$conf/strongswan.conf
if [ "$initiator" = 1 ] && ! swanctl --list-sas --child xwamp 2>/dev/null | grep -q INSTALLED; then
    if swanctl --initiate --child xwamp --timeout 15 >/dev/null 2>&1; then
        echo "tunnel up"
    else
        echo "tunnel not up yet (peer not provisioned?): the agents' traffic will trigger it"
    fi
fi
