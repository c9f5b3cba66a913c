#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# The xwamp agent on a lab node: a venv built from the synced checkout, the
# agent configuration rendered by the shared lab/render-agent.sh, and the
# packaged systemd unit (packaging/xwamp.service) pointed at the venv.
# Idempotent: pip runs only when the source changed (a hash of the package
# files), the service restarts only when code or configuration changed.
set -euo pipefail
repo=${XWAMP_REPO:-/xwamp}
here=$repo/vagrant/provision
# shellcheck source=lib.sh
. "$here/lib.sh"
: "${XW_NAME:?}" "${XW_PEER:?}" "${XW_LOCAL_INNER:?}" "${XW_REMOTE_INNER:?}"
venv=/opt/xwamp/venv
restart=no

# 1. Install (or update) xwamp into the venv when the source changed.
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
src_hash=$(cd "$repo" && find pyproject.toml agent netlink exporters -type f -name '*.py' -o -name pyproject.toml \
           | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat /opt/xwamp/source.sha256 2>/dev/null || true)" != "$src_hash" ]; then
    # A copy: pip builds in the source tree, and the synced folder is the host's.
    build=$(mktemp -d)
    cp -a "$repo/pyproject.toml" "$repo/README.md" "$repo/agent" "$repo/netlink" "$repo/exporters" "$build/"
    "$venv/bin/pip" install -q --upgrade "$build"
    rm -rf "$build"
    echo "$src_hash" > /opt/xwamp/source.sha256
    echo "changed: xwamp installed into $venv"
    restart=yes
fi

# 2. Configuration: the exporter listens on the inner address, so Prometheus
# on node a scrapes node b through the IPsec tunnel.
out=$(XW_NETNS="" XW_EXPORTER_LISTEN=$XW_LOCAL_INNER "$repo/lab/render-agent.sh" /etc/xwamp/xwamp.toml)
if [ -n "$out" ]; then echo "$out"; restart=yes; fi
if "$venv/bin/xwamp" agent --help >/dev/null 2>&1; then
    "$venv/bin/xwamp" agent --config /etc/xwamp/xwamp.toml --check
else
    echo "agent.sh: this checkout's xwamp has no 'agent' command yet: configuration not checked"
fi

# 3. The service: the packaged unit, its user (sysusers.d) and runtime dirs
# (tmpfiles.d), with every Exec line pointed at the venv.
unit=$repo/packaging/xwamp.service
changed=no
# User=xwamp must exist before the unit starts, or systemd fails it with 217/USER.
if put_file "$repo/packaging/xwamp.sysusers.conf" /usr/lib/sysusers.d/xwamp.conf 0644 || ! getent passwd xwamp >/dev/null; then
    systemd-sysusers /usr/lib/sysusers.d/xwamp.conf
fi
if put_file "$repo/packaging/xwamp.tmpfiles.conf" /usr/lib/tmpfiles.d/xwamp.conf 0644; then
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/xwamp.conf
fi
put_file "$unit" /etc/systemd/system/xwamp.service 0644 && changed=yes
tmp=$(mktemp)
# Both Exec lines name /usr/bin/xwamp in the packaged unit: reset both, or the
# unit fails with 203/EXEC on a machine where xwamp lives in a venv.
printf '%s\n' "# The Vagrant lab runs xwamp from a venv (vagrant/provision/agent.sh)." "[Service]" \
    "ExecStartPre=" "ExecStartPre=$venv/bin/xwamp agent --config /etc/xwamp/xwamp.toml --check" \
    "ExecStart=" "ExecStart=$venv/bin/xwamp agent --config /etc/xwamp/xwamp.toml" > "$tmp"
put_file "$tmp" /etc/systemd/system/xwamp.service.d/vagrant-lab.conf 0644 && changed=yes
rm -f "$tmp"
if [ $changed = yes ]; then systemctl daemon-reload; restart=yes; fi
if [ $restart = yes ] && systemctl is-active --quiet xwamp.service; then
    systemctl restart xwamp.service
fi
enable_start xwamp.service
