#!/bin/sh
# Installs the system packages crashbench needs, when root and when missing.
# Non-root users get a list of what is missing instead.
set -e
need=""
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

for p in fuse3 iproute2 nginx; do
    have_pkg "$p" || need="$need $p"
done
# PostgreSQL server binaries: any installed major version will do.
if ! have_cmd initdb && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    need="$need postgresql"
fi
# The postgres workload's verify phase runs pg_amcheck (PostgreSQL >= 14, beside the server)
# with the amcheck extension (contrib).
if ! ls /usr/lib/postgresql/*/bin/pg_amcheck >/dev/null 2>&1 && ! have_cmd pg_amcheck; then
    need="$need postgresql postgresql-client"
fi
if ! ls /usr/share/postgresql/*/extension/amcheck.control >/dev/null 2>&1; then
    need="$need postgresql-contrib"
fi
[ -z "$need" ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "crashbench: missing system packages:$need (install them as root, or run make as root)" >&2
    exit 0
fi
echo "crashbench: installing system packages:$need"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends $need >/dev/null
# The Debian package starts a system nginx on port 80; crashbench runs its own instances.
if have_pkg nginx && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
fi
pkill -f 'nginx: master process /usr/sbin/nginx' 2>/dev/null || true
