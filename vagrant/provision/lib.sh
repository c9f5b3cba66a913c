# shellcheck shell=bash
# Helpers for vagrant/provision/*.sh (sourced).
# bash 5.2 treats '&' in ${var/pat/rep} as the match; our values are literal.
shopt -u patsub_replacement 2>/dev/null || true

# put_file SRC DST MODE: install SRC as DST only when the content differs;
# returns 0 when DST changed, 1 when it was already up to date (so callers
# restart a service only on change).
put_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        return 1
    fi
    install -D -m "$3" "$1" "$2"
    echo "changed: $2"
}

# enable_start UNIT: enable and start; quiet and changeless when it already is.
enable_start() {
    systemctl is-enabled --quiet "$1" 2>/dev/null || systemctl enable --quiet "$1"
    systemctl is-active --quiet "$1" || systemctl start "$1"
}
