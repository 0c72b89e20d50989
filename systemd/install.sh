#!/usr/bin/env bash
# Installs Supavisor-rs as a systemd service. Idempotent; run as root from the repository
# after `cargo build --release`:
#
#   sudo systemd/install.sh            # install or update; starts nothing
#   sudo systemd/install.sh --start    # ... then enable and (re)start supavisor.service
#
# Environment: PREFIX (default /usr/local), TARGET_DIR (default $CARGO_TARGET_DIR or target),
# SYSCTL=0 to skip the sysctl file. An existing /etc/supavisor/supavisor.toml or env file is
# never overwritten.
set -euo pipefail

start=0
for arg in "$@"; do
    case "$arg" in
        --start) start=1 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root" >&2
    exit 1
fi

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
prefix="${PREFIX:-/usr/local}"
target="${TARGET_DIR:-${CARGO_TARGET_DIR:-$repo/target}}"

for bin in supavisor supavisorctl; do
    if [ ! -x "$target/release/$bin" ]; then
        echo "install.sh: $target/release/$bin is missing: run cargo build --release first" >&2
        exit 1
    fi
done

# The service user: a system account without a login shell or home.
if ! getent group supavisor >/dev/null; then
    groupadd --system supavisor
fi
if ! id -u supavisor >/dev/null 2>&1; then
    nologin="$(command -v nologin || echo /usr/sbin/nologin)"
    useradd --system --gid supavisor --home-dir /var/lib/supavisor --no-create-home \
        --shell "$nologin" --comment "Supavisor-rs pooler" supavisor
fi

install -d -m 0755 -o root -g root "$prefix/bin"
install -m 0755 -o root -g root "$target/release/supavisor" "$prefix/bin/supavisor"
install -m 0755 -o root -g root "$target/release/supavisorctl" "$prefix/bin/supavisorctl"

install -d -m 0750 -o root -g supavisor /etc/supavisor
if [ ! -e /etc/supavisor/supavisor.toml ]; then
    install -m 0640 -o root -g supavisor "$here/supavisor.toml" /etc/supavisor/supavisor.toml
fi
if [ ! -e /etc/supavisor/env ]; then
    umask 027
    {
        echo "# Secrets of the supavisor service (read by systemd as root)."
        echo "VAULT_ENC_KEY=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        echo "API_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
        echo "METRICS_JWT_SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    } > /etc/supavisor/env
    chown root:supavisor /etc/supavisor/env
    chmod 0640 /etc/supavisor/env
fi
install -d -m 0700 -o supavisor -g supavisor /var/lib/supavisor

unitdir=/etc/systemd/system
install -d -m 0755 "$unitdir"
for unit in supavisor.service supavisor@.service; do
    sed "s|/usr/local/bin/supavisor|$prefix/bin/supavisor|g" "$here/$unit" > "$unitdir/$unit.tmp"
    chmod 0644 "$unitdir/$unit.tmp"
    mv "$unitdir/$unit.tmp" "$unitdir/$unit"
done

if [ "${SYSCTL:-1}" != 0 ]; then
    install -d -m 0755 /etc/sysctl.d
    install -m 0644 "$here/99-supavisor.conf" /etc/sysctl.d/99-supavisor.conf
    if command -v sysctl >/dev/null; then
        sysctl -q -p /etc/sysctl.d/99-supavisor.conf || echo "install.sh: some sysctl settings were not applied (container?)" >&2
    fi
fi

if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    if [ "$start" = 1 ]; then
        systemctl enable supavisor.service
        systemctl restart supavisor.service
        systemctl --no-pager status supavisor.service || true
    fi
else
    echo "install.sh: systemd is not running here; files installed, nothing reloaded" >&2
    if [ "$start" = 1 ]; then
        echo "install.sh: --start needs systemd" >&2
        exit 1
    fi
fi
echo "installed: $prefix/bin/supavisor, $unitdir/supavisor.service, $unitdir/supavisor@.service"
