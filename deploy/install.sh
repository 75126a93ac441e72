#!/usr/bin/env bash
# Install or upgrade cleanroom-edge from the offline bundle this script is part of
# (`make bundle` -> dist/cleanroom-edge-VERSION-bundle/), without the network:
#   sudo ./install.sh                    # on the gateway, from the unpacked bundle
#   ./install.sh --prefix /tmp/stage     # everything under a staging root (tests, packaging)
#   ./install.sh --prefix / --no-cert    # image builds: no key baked into the image
# Every file is checked against SHA256SUMS, then pip installs the locked wheels with
# --no-index --require-hashes into a new venv under /opt/cleanroom-edge/venvs/; the
# /opt/cleanroom-edge/venv link moves to it only once it is complete, so a failed upgrade
# leaves the running version untouched and the previous venv stays for a rollback.
# /etc/cleanroom-edge (configuration) and /var/lib/cleanroom-edge (buffer) are never
# overwritten. Upgrade, rollback and uninstall: docs/operations.md.
set -euo pipefail

usage() {
    echo "usage: $0 [--prefix DIR] [--python PYTHON] [--no-cert]" >&2
    exit 2
}
die() {
    echo "install.sh: $*" >&2
    exit 1
}

prefix=/
python=${PYTHON:-python3}
make_cert=1
while [ $# -gt 0 ]; do
    case $1 in
    --prefix) [ $# -ge 2 ] || usage; prefix=$2; shift 2 ;;
    --python) [ $# -ge 2 ] || usage; python=$2; shift 2 ;;
    --no-cert) make_cert=0; shift ;;
    -h | --help) usage ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage ;;
    esac
done

user=cleanroom
bundle=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=${prefix%/}
opt=$root/opt/cleanroom-edge
etc=$root/etc/cleanroom-edge
var=$root/var/lib/cleanroom-edge
unit_dir=$root/etc/systemd/system

# A real install owns system accounts and the service; a staging root gets files only.
system=0
if [ -z "$root" ]; then
    [ "$(id -u)" = 0 ] || die "run as root (or use --prefix DIR to install into a staging root)"
    system=1
else
    echo "staging root $root: no system user, no file ownership, no systemctl"
fi

[ -f "$bundle/SHA256SUMS" ] || die "$bundle/SHA256SUMS is missing: run this script from an unpacked bundle"
(cd "$bundle" && sha256sum --check --quiet --strict SHA256SUMS) ||
    die "the bundle does not match its SHA256SUMS (damaged or altered): nothing installed"

command -v "$python" >/dev/null || die "$python not found: install Python 3.11-3.13 (python3-venv) first"
target=$("$python" -c 'import platform, sys; print(platform.machine(), "%d.%d" % sys.version_info[:2])')
grep -qx "$target" "$bundle/TARGETS" ||
    die "this bundle has no wheels for '$target' (platform, Python); it has: $(tr '\n' ';' <"$bundle/TARGETS")"
wheels=("$bundle"/cleanroom_edge-*-py3-none-any.whl)
if [ ${#wheels[@]} != 1 ] || [ ! -f "${wheels[0]}" ]; then
    die "expected exactly one cleanroom_edge wheel in $bundle"
fi
wheel=${wheels[0]}
version=$(basename "$wheel" | cut -d- -f2)

if [ "$system" = 1 ]; then
    if ! id "$user" >/dev/null 2>&1; then
        useradd --system --user-group --home-dir /var/lib/cleanroom-edge --no-create-home \
            --shell /usr/sbin/nologin "$user"
    fi
    # Serial ports (Modbus RTU, particle counters) through their group, nothing wider.
    if getent group dialout >/dev/null; then usermod -a -G dialout "$user"; fi
fi
# own PATH OWNER:GROUP MODE: ownership only on a real install (a staging root has no such user).
own() {
    if [ "$system" = 1 ]; then chown "$2" "$1"; fi
    chmod "$3" "$1"
}

install -d -m 0755 "$opt" "$opt/venvs" "$unit_dir"
install -d -m 0750 "$etc"
own "$etc" "root:$user" 0750
install -d -m 0700 "$var"
own "$var" "$user:$user" 0700

# pip sees only the bundle: no index, no config file, no cache, whatever this machine has set.
while IFS='=' read -r name _; do unset "$name"; done < <(env | grep '^PIP_' || true)
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
venv=$opt/venvs/$version-$(date -u +%Y%m%dT%H%M%SZ)
echo "installing cleanroom-edge $version into $venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --no-index --find-links "$bundle/wheels" --only-binary=:all: \
    --require-hashes -r "$bundle/requirements.lock" ||
    { rm -rf "$venv"; die "installing the locked dependencies failed: nothing changed"; }
"$venv/bin/python" -m pip install --quiet --no-index --no-deps "$wheel" ||
    { rm -rf "$venv"; die "installing $wheel failed: nothing changed"; }
"$venv/bin/python" -m pip check >/dev/null || { rm -rf "$venv"; die "pip check failed: nothing changed"; }

# Switch atomically, then keep only the new venv and the one it replaced (for a rollback).
previous=$(readlink "$opt/venv" 2>/dev/null || true)
ln -sfn "venvs/$(basename "$venv")" "$opt/venv.new"
mv -T "$opt/venv.new" "$opt/venv"
for old in "$opt"/venvs/*; do
    case venvs/$(basename "$old") in
    "venvs/$(basename "$venv")" | "$previous") ;;
    *) rm -rf "$old" ;;
    esac
done

bundled=$("$opt/venv/bin/python" -c 'from cleanroom_common.bundled import package_dir; print(package_dir("agent.bundled"))')
rm -rf "$opt/docs"
cp -rL "$bundled/docs" "$opt/docs"
install -m 0755 "$bundle/uninstall.sh" "$opt/uninstall.sh"

# Configuration: the example the first time only; afterwards the new example sits beside it.
if [ -f "$etc/agent.yaml" ]; then
    echo "kept $etc/agent.yaml (the example of $version is $etc/agent.yaml.example)"
else
    install -m 0640 "$bundle/agent.yaml" "$etc/agent.yaml"
    own "$etc/agent.yaml" "root:$user" 0640
fi
install -m 0640 "$bundle/agent.yaml" "$etc/agent.yaml.example"
own "$etc/agent.yaml.example" "root:$user" 0640

# The OPC UA application certificate the example configuration names, made once per gateway.
if [ "$make_cert" = 1 ] && [ ! -f "$etc/opcua/key.pem" ]; then
    install -d -m 0700 "$etc/opcua" "$etc/opcua/trusted"
    "$opt/venv/bin/cleanroom-agent" certs create --out "$etc/opcua" \
        --uri "urn:$(uname -n):cleanroom-edge" --hostname "$(uname -n)" >/dev/null
    if [ "$system" = 1 ]; then chown -R "$user:$user" "$etc/opcua"; fi
fi
# Keys are for the service user only, whoever made them (an older install made them root's).
while IFS= read -r -d '' key; do
    own "$key" "$user:$user" 0600
done < <(find "$etc" -type f \( -name '*.key' -o -name 'key.pem' -o -name '*-key.pem' \) -print0)

install -m 0644 "$bundle/cleanroom-agent.service" "$unit_dir/cleanroom-agent.service"
if [ "$system" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable cleanroom-agent.service
    if systemctl is-active --quiet cleanroom-agent.service; then
        systemctl restart cleanroom-agent.service
        echo "restarted cleanroom-agent on $version"
    fi
elif [ "$system" = 1 ]; then
    echo "systemd is not running here: unit installed, not enabled"
fi

echo "installed $("$opt/venv/bin/cleanroom-agent" --version) in $opt"
echo "next: edit $etc/agent.yaml, then"
echo "  $opt/venv/bin/cleanroom-agent validate $etc/agent.yaml"
echo "  systemctl start cleanroom-agent"
