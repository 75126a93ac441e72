#!/usr/bin/env bash
# Remove cleanroom-edge: the service, its unit and /opt/cleanroom-edge. The configuration
# (/etc/cleanroom-edge) and the buffer (/var/lib/cleanroom-edge, which may hold readings
# not yet delivered) are kept unless --purge is given; --purge also removes the user.
#   sudo /opt/cleanroom-edge/uninstall.sh [--purge]
#   ./uninstall.sh --prefix /tmp/stage [--purge]     # a staging root made by install.sh --prefix
set -euo pipefail

usage() {
    echo "usage: $0 [--prefix DIR] [--purge]" >&2
    exit 2
}
prefix=/
purge=0
while [ $# -gt 0 ]; do
    case $1 in
    --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
    --purge) purge=1; shift ;;
    -h | --help) usage ;;
    *) echo "uninstall.sh: unknown argument: $1" >&2; usage ;;
    esac
done

user=cleanroom
root=${prefix%/}
system=0
if [ -z "$root" ]; then
    [ "$(id -u)" = 0 ] || { echo "uninstall.sh: run as root" >&2; exit 1; }
    system=1
fi
unit=$root/etc/systemd/system/cleanroom-agent.service

if [ "$system" = 1 ] && [ -d /run/systemd/system ]; then
    # A clean stop commits and delivers what it can within agent.shutdown_grace.
    systemctl disable --now cleanroom-agent.service 2>/dev/null || true
fi
rm -f "$unit"
if [ "$system" = 1 ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
rm -rf "$root/opt/cleanroom-edge"

if [ "$purge" = 1 ]; then
    rm -rf "$root/etc/cleanroom-edge" "$root/var/lib/cleanroom-edge"
    if [ "$system" = 1 ] && id "$user" >/dev/null 2>&1; then userdel "$user"; fi
    echo "removed cleanroom-edge, its configuration and its buffer"
else
    echo "removed cleanroom-edge; kept $root/etc/cleanroom-edge and $root/var/lib/cleanroom-edge" \
        "(undelivered readings stay in the buffer; --purge removes them)"
fi
