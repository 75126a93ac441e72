#!/usr/bin/env bash
# Install cleanroom-edge on a gateway from its wheel (built in the repository with
# `python3 -m pip wheel --no-deps -w dist .`):
#   sudo ./install.sh cleanroom_edge-0.2.0-py3-none-any.whl
# Creates the 'cleanroom' user, /opt/cleanroom-edge (virtualenv, docs), /etc/cleanroom-edge
# (config, kept on upgrade), /var/lib/cleanroom-edge (buffer, kept on upgrade), and the
# systemd unit; the example configuration, the docs and the unit come from the installed
# package, not from a checkout. Re-running it with a newer wheel upgrades in place; the
# buffer's schema migrates on the next start without discarding undelivered data
# (docs/operations.md). pip fetches the dependencies from the package index.
set -euo pipefail
wheel=${1:-}
[ -n "$wheel" ] && [ -f "$wheel" ] || { echo "usage: $0 cleanroom_edge-VERSION-py3-none-any.whl" >&2; exit 2; }
prefix=/opt/cleanroom-edge
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
id cleanroom >/dev/null 2>&1 || useradd --system --home /var/lib/cleanroom-edge --shell /usr/sbin/nologin cleanroom
usermod -a -G dialout cleanroom || true
install -d -o cleanroom -g cleanroom -m 0750 /var/lib/cleanroom-edge
install -d -m 0755 /etc/cleanroom-edge /etc/cleanroom-edge/profiles "$prefix"
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet --upgrade "$wheel"
bundled=$("$prefix/venv/bin/python" -c 'from cleanroom_common.bundled import package_dir; print(package_dir("agent.bundled"))')
rm -rf "$prefix/docs"
cp -r "$bundled/docs" "$prefix/docs"
[ -f /etc/cleanroom-edge/agent.yaml ] || install -m 0640 -g cleanroom "$bundled/examples/agent.yaml" /etc/cleanroom-edge/agent.yaml
install -m 0644 "$bundled/systemd/cleanroom-agent.service" /etc/systemd/system/cleanroom-agent.service
systemctl daemon-reload 2>/dev/null || true
echo "installed $("$prefix/venv/bin/cleanroom-agent" --version). Edit /etc/cleanroom-edge/agent.yaml, then:"
echo "  $prefix/venv/bin/cleanroom-agent validate /etc/cleanroom-edge/agent.yaml"
echo "  systemctl enable --now cleanroom-agent"
