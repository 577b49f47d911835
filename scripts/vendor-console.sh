#!/usr/bin/env bash
# Vendors the centrifuge-js browser bundle into the operator console's static files.
#
# shim/app/console/static/vendor/ is committed build output of a pinned npm package, so the
# service serves the console with no node toolchain at install or run time. To update,
# change VERSION below (keep tests/js/package.json on the same version) and rerun:
#
#     scripts/vendor-console.sh
#
# The package tarball comes from the npm registry through `npm pack`, which checks it
# against the registry's integrity hash; the files are copied unmodified.
set -euo pipefail

VERSION="5.7.4"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/shim/app/console/static/vendor"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

tarball="$(npm pack "centrifuge@$VERSION" --pack-destination "$WORK" --silent)"
tar -xzf "$WORK/$tarball" -C "$WORK"
packed_version="$(node -p "require('$WORK/package/package.json').version")"
if [[ "$packed_version" != "$VERSION" ]]; then
    echo "expected centrifuge $VERSION, got $packed_version" >&2
    exit 1
fi

mkdir -p "$DEST"
# dist/centrifuge.js is the SDK's browser build: an IIFE that sets globalThis.Centrifuge
# (JSON protocol only, which is what the console uses).
cp "$WORK/package/dist/centrifuge.js" "$DEST/centrifuge.js"
cp "$WORK/package/LICENSE" "$DEST/centrifuge.LICENSE"
sha="$(sha256sum "$DEST/centrifuge.js" | cut -d' ' -f1)"
cat > "$DEST/README.md" <<NOTE
# Vendored browser code (generated: do not edit)

- centrifuge.js: \`dist/centrifuge.js\` of the npm package centrifuge@$VERSION, unmodified
  (sha256 $sha). Licence: centrifuge.LICENSE (MIT).

Regenerate with \`scripts/vendor-console.sh\`.
NOTE
echo "vendored centrifuge@$VERSION into ${DEST#"$ROOT"/}"
