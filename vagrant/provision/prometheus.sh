#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Prometheus (Debian's package) on the lab node that has it, scraping every
# node's xwamp exporter. XW_SCRAPE lists "name=inner-address" pairs.
# Idempotent: the configuration is replaced and Prometheus reloaded only when
# the rendered file differs. XW_PROMETHEUS_CONF and XW_RENDER_ONLY=1 (no
# service handling) let the host tests render it (tests/test_vagrant.py).
set -euo pipefail
repo=${XWAMP_REPO:-/xwamp}
here=$repo/vagrant/provision
# shellcheck source=lib.sh
. "$here/lib.sh"
: "${XW_SCRAPE:?name=address pairs, e.g. 'a=10.77.1.1 b=10.77.2.1'}"
port=${XW_EXPORTER_PORT:-9862}
targets=""
for pair in $XW_SCRAPE; do
    targets+="      - targets: [\"${pair#*=}:$port\"]"$'\n'"        labels: {node: \"${pair%%=*}\"}"$'\n'
done
tmp=$(mktemp)
text=$(<"$here/prometheus.yml.in")
printf '%s\n' "${text/@TARGETS@/${targets%$'\n'}}" > "$tmp"
conf=${XW_PROMETHEUS_CONF:-/etc/prometheus/prometheus.yml}
changed=no
put_file "$tmp" "$conf" 0644 && changed=yes
rm -f "$tmp"
[ "${XW_RENDER_ONLY:-0}" = 1 ] && exit 0
if [ $changed = yes ]; then
    if command -v promtool >/dev/null; then promtool check config "$conf" >/dev/null; fi
    if systemctl is-active --quiet prometheus; then systemctl reload-or-restart prometheus; fi
fi
enable_start prometheus
