#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Render one lab node's xwamp agent configuration from lab/xwamp.toml.in.
#   lab/render-agent.sh OUTFILE   with:
#     XW_NAME XW_PEER XW_LOCAL_INNER XW_REMOTE_INNER   (as for lab/render.sh)
#     XW_NETNS            run the agent in this netns (QEMU harness); empty on a real host
#     XW_EXPORTER_LISTEN  default XW_LOCAL_INNER (Prometheus scrapes through the tunnel)
#     XW_EXPORTER_PORT    default 9862
#     XW_DISCOVER=1       lab/xwamp-discover.toml.in: no peers, tunnels discovered from the SAs
#     XW_INTERVAL XW_COUNT  discovery sessions' packet interval (s) and packets per cycle
# Idempotent like lab/render.sh: prints "changed: OUTFILE" only when it changes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"
out=${1:?usage: lab/render-agent.sh OUTFILE}
: "${XW_NAME:?}" "${XW_PEER:?}" "${XW_LOCAL_INNER:?}" "${XW_REMOTE_INNER:?}"
netns_line="# netns: none, the agent runs in the host's own namespace"
[ -n "${XW_NETNS:-}" ] && netns_line="netns = \"$XW_NETNS\""
mkdir -p "$(dirname "$out")"
template=$here/xwamp.toml.in
[ "${XW_DISCOVER:-0}" = 1 ] && template=$here/xwamp-discover.toml.in
subst "$template" NAME="$XW_NAME" PEER="$XW_PEER" NETNS_LINE="$netns_line" \
    LOCAL_INNER="$XW_LOCAL_INNER" REMOTE_INNER="$XW_REMOTE_INNER" \
    EXPORTER_LISTEN="${XW_EXPORTER_LISTEN:-$XW_LOCAL_INNER}" \
    EXPORTER_PORT="${XW_EXPORTER_PORT:-9862}" INTERVAL="${XW_INTERVAL:-0.5}" COUNT="${XW_COUNT:-20}" > "$out.new"
install_if_changed "$out.new" "$out" 644
