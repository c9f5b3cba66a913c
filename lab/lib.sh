# shellcheck shell=bash
# Helpers shared by lab/render*.sh (sourced, not run).
# bash 5.2 treats '&' in ${var//pat/rep} as the match; our values are literal.
shopt -u patsub_replacement 2>/dev/null || true

# install_if_changed SRC DST MODE: replace DST only when SRC differs, and say
# so on stdout ("changed: DST"): provisioning reloads only on change, and a
# re-run with the same inputs changes nothing.
install_if_changed() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        rm -f "$1"
    else
        chmod "$3" "$1"
        mv -f "$1" "$2"
        echo "changed: $2"
    fi
}

# subst TEMPLATE KEY=VALUE...: print the template with every @KEY@ replaced.
subst() {
    local text key val kv
    text=$(<"$1"); shift
    for kv in "$@"; do
        key=${kv%%=*}; val=${kv#*=}
        text=${text//@"$key"@/"$val"}
    done
    printf '%s\n' "$text"
}
