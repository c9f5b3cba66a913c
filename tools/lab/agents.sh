#!/usr/bin/env bash
# xwamp agents on the two lab routers (the namespaces of tools/lab/strongswan.sh
# or tools/lab/tunnel.sh), configured by the shared lab/render-agent.sh - the
# same renderer and template the Vagrant lab provisions its agents with.
#   tools/lab/agents.sh up [PREFIX]       start an agent in PREFIX-a and PREFIX-b, wait for both exporters
#   tools/lab/agents.sh down [PREFIX]
#   tools/lab/agents.sh scrape a|b [PREFIX]   print that agent's /metrics
# Each agent runs inside its namespace (`ip netns exec`), its exporter on the
# node's inner address (10.77.1.1 / 10.77.2.1, port 9862), as on the Vagrant VMs.
# Environment: XWAMP_PYTHON (default the checkout's .venv), XWAMP_LAB_STATE, XWAMP_LAB_WAIT;
# XWAMP_LAB_DISCOVER=1 configures tunnel auto-discovery instead of a configured peer
# (lab/xwamp-discover.toml.in), XWAMP_LAB_INTERVAL / XWAMP_LAB_COUNT its packet schedule.
set -euo pipefail
cmd=${1:-up}; shift || true
node=
if [ "$cmd" = scrape ]; then node=${1:?usage: scrape a|b [PREFIX]}; shift; fi
p=${1:-xs}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${XWAMP_LAB_STATE:-/tmp/xwamp-lab}/$p
wait_s=${XWAMP_LAB_WAIT:-120}
PY=${XWAMP_PYTHON:-$repo/.venv/bin/python}
port=9862
declare -A inner=([a]=10.77.1.1 [b]=10.77.2.1) peer=([a]=b [b]=a)

log() { echo "agents.sh: $*" >&2; }

scrape() { # NODE: the exporter's text, from inside the node's namespace
    ip netns exec "$p-$1" curl -sf --max-time 10 "http://${inner[$1]}:$port/metrics"
}

down() {
    local n pid
    for n in a b; do
        pid=$(cat "$state/$n/agent.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            # The agent says Stop-Sessions to its peers first: give it time.
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$state/$n/agent.pid"
    done
}

case $cmd in
down) down; exit 0;;
scrape) scrape "$node"; exit $?;;
up) ;;
*) echo "usage: $0 up|down [PREFIX] | scrape a|b [PREFIX]" >&2; exit 2;;
esac

for n in a b; do
    ip netns pids "$p-$n" >/dev/null 2>&1 || { log "namespace $p-$n missing: tools/lab/strongswan.sh up $p first"; exit 1; }
done
down
for n in a b; do
    mkdir -p "$state/$n"
    # netns empty: `ip netns exec` already puts the whole agent in the router's namespace.
    XW_NAME=$n XW_PEER=${peer[$n]} XW_LOCAL_INNER=${inner[$n]} XW_REMOTE_INNER=${inner[${peer[$n]}]} \
    XW_NETNS="" XW_EXPORTER_LISTEN=${inner[$n]} XW_EXPORTER_PORT=$port \
    XW_DISCOVER=${XWAMP_LAB_DISCOVER:-0} XW_INTERVAL=${XWAMP_LAB_INTERVAL:-0.5} XW_COUNT=${XWAMP_LAB_COUNT:-20} \
        "$repo/lab/render-agent.sh" "$state/$n/xwamp.toml" >/dev/null
    setsid ip netns exec "$p-$n" "$PY" -m agent agent --config "$state/$n/xwamp.toml" \
        > "$state/$n/agent.log" 2>&1 < /dev/null &
    echo $! > "$state/$n/agent.pid"
done
end=$((SECONDS + wait_s))
for n in a b; do
    until scrape $n >/dev/null 2>&1; do
        if ! kill -0 "$(cat "$state/$n/agent.pid")" 2>/dev/null || [ $SECONDS -ge $end ]; then
            log "agent $n did not come up; its log:"; tail -n 40 "$state/$n/agent.log" >&2; exit 1
        fi
        sleep 0.5
    done
done
echo "agents up: exporters on ${inner[a]}:$port ($p-a) and ${inner[b]}:$port ($p-b)"
