#!/usr/bin/env bash
# Debian packages the lab node needs; apt runs only when one is missing, so a
# re-provision neither touches the network nor changes anything.
set -euo pipefail
pkgs=(strongswan-charon strongswan-swanctl openssl iproute2 iputils-ping kmod python3-venv python3-pip)
[ "${XW_PROMETHEUS:-0}" = 1 ] && pkgs+=(prometheus)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's own strongSwan service (ipsec starter, if some package pulled it in)
# would run a second charon on UDP 500 with the same pid file: the lab's
# xwamp-charon.service is the only IKE daemon here.
if systemctl list-unit-files strongswan-starter.service >/dev/null 2>&1 \
   && systemctl is-enabled --quiet strongswan-starter.service 2>/dev/null; then
    systemctl disable --now strongswan-starter.service
fi
