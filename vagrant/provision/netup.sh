#!/usr/bin/env bash
# Put the inner address on lo and route the peer's inner address out of the
# interface that holds our outer address, with the inner address as source, so
# the tunnel's /32 selectors match (the XFRM policy then encrypts). Safe to
# re-run: `replace` and an existence check instead of `add`.
set -euo pipefail
: "${XW_LOCAL_OUTER:?}" "${XW_LOCAL_INNER:?}" "${XW_REMOTE_INNER:?}"
if ! ip -o -4 addr show dev lo | grep -q " $XW_LOCAL_INNER/32 "; then
    ip addr add "$XW_LOCAL_INNER/32" dev lo
fi
# The private network comes up asynchronously: wait for our outer address.
dev=""
for _ in $(seq 300); do
    dev=$(ip -o -4 addr show | awk -v a="$XW_LOCAL_OUTER" 'index($4, a "/") == 1 { print $2; exit }')
    [ -n "$dev" ] && break
    sleep 0.1
done
[ -n "$dev" ] || { echo "netup.sh: no interface holds $XW_LOCAL_OUTER" >&2; exit 1; }
ip route replace "$XW_REMOTE_INNER/32" dev "$dev" src "$XW_LOCAL_INNER"
