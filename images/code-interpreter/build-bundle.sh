#!/bin/sh
# Builds the bundle burrow copies into each sandbox created from the `code-interpreter-v1`
# template while that template runs on the `system` image (docs/code-interpreter.md): this
# folder's server.py and the pinned packages of requirements.txt under site/, as a tar
# compressed with zstd. Usage: build-bundle.sh OUT.tar.zst (a server looks for
# <data dir>/templates/code-interpreter-v1.tar.zst).
#
# The packages are built for the python3 at $PYTHON (default /usr/bin/python3): the `system`
# image is the host's /usr, so that is the Python sandboxes run.
set -eu
out=${1:?usage: build-bundle.sh OUT.tar.zst}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-/usr/bin/python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# Debian's Python has no pip outside a virtual environment: one only to run pip.
"$python" -m venv "$tmp/pip"
"$tmp/pip/bin/pip" install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --target "$tmp/root/site" -r "$here/requirements.txt"
cp "$here/server.py" "$tmp/root/server.py"
chmod -R u+rwX,go+rX,go-w "$tmp/root"
mkdir -p "$(dirname "$out")"
tar --owner=0 --group=0 --numeric-owner -C "$tmp/root" -cf - . | zstd -q -T0 -9 -o "$out.tmp" -f
mv "$out.tmp" "$out"
echo "$out: $(du -h "$out" | cut -f1)"
