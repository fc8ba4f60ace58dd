# Helpers shared by the .ci scripts (sourced, not run).

step() {
    printf '\n==> %s  [%s]\n' "$*" "$(date -u +%H:%M:%S)"
}

# ensure_component TOOLCHAIN COMPONENT: install a rustup component if absent.
ensure_component() {
    if ! rustup component list --toolchain "$1" --installed 2>/dev/null | grep -q "^$2"; then
        rustup component add --toolchain "$1" "$2"
    fi
}

host_triple() {
    rustc -vV | sed -n 's/^host: //p'
}
