#!/usr/bin/env bash
# Install cleanroom-edge on a gateway from a checkout (or an unpacked release):
#   sudo deploy/install.sh
# Creates the 'cleanroom' user, /opt/cleanroom-edge (virtualenv), /etc/cleanroom-edge
# (config, kept on upgrade), /var/lib/cleanroom-edge (buffer, kept on upgrade), and the
# systemd unit. Re-running it upgrades the code in place; the buffer's schema migrates
# on the next start without discarding undelivered data (docs/operations.md).
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/cleanroom-edge
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
id cleanroom >/dev/null 2>&1 || useradd --system --home /var/lib/cleanroom-edge --shell /usr/sbin/nologin cleanroom
usermod -a -G dialout cleanroom || true
install -d -o cleanroom -g cleanroom -m 0750 /var/lib/cleanroom-edge
install -d -m 0755 /etc/cleanroom-edge /etc/cleanroom-edge/profiles "$prefix"
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet --upgrade "$src"
cp -r "$src/docs" "$prefix/"
[ -f /etc/cleanroom-edge/agent.yaml ] || install -m 0640 -g cleanroom "$src/deploy/examples/agent.yaml" /etc/cleanroom-edge/agent.yaml
install -m 0644 "$src/deploy/systemd/cleanroom-agent.service" /etc/systemd/system/cleanroom-agent.service
systemctl daemon-reload 2>/dev/null || true
echo "installed. Edit /etc/cleanroom-edge/agent.yaml, then:"
echo "  $prefix/venv/bin/cleanroom-agent validate /etc/cleanroom-edge/agent.yaml"
echo "  systemctl enable --now cleanroom-agent"
