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

# ensure_target TRIPLE: install the stable standard library for TRIPLE if absent.
ensure_target() {
    if ! rustup target list --toolchain stable --installed 2>/dev/null | grep -qx "$1"; then
        rustup target add --toolchain stable "$1"
    fi
}

host_triple() {
    rustc -vV | sed -n 's/^host: //p'
}

# rust_version: the `rust-version` in the root Cargo.toml's [package]
# (e.g. 1.85), the one place the MSRV is written.
rust_version() {
    local version
    version=$(sed -n '/^\[package\]/,/^\[/s/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml)
    if [ -z "$version" ]; then
        echo "no rust-version in Cargo.toml's [package]" >&2
        return 1
    fi
    printf '%s\n' "$version"
}

# ensure_toolchain TOOLCHAIN: install a rustup toolchain (minimal profile)
# if absent.
ensure_toolchain() {
    if ! rustup run "$1" rustc --version >/dev/null 2>&1; then
        rustup toolchain install "$1" --profile minimal
    fi
}
