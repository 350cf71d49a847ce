#!/usr/bin/env bash
# Re-fetch the console's vendored JS/CSS from the npm registry at pinned versions,
# verify each tarball's registry integrity, copy the files the console serves into
# fleet/console/static/vendor/ and print their sha256 (for VENDOR.md). Not run by the
# build or the tests: the files are committed; this is how they got there.
set -euo pipefail
cd "$(dirname "$0")/.."
HTMX=2.0.11
UPLOT=1.6.32
HTMX_SRI="sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA=="
UPLOT_SRI="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
out=fleet/console/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
check() {  # tarball, expected "sha512-<base64>"
  local got
  got="sha512-$(openssl dgst -sha512 -binary "$1" | base64 -w0)"
  [ "$got" = "$2" ] || { echo "integrity mismatch for $1" >&2; exit 1; }
}
(cd "$work" && npm pack --silent "htmx.org@$HTMX" "uplot@$UPLOT" >/dev/null)
check "$work/htmx.org-$HTMX.tgz" "$HTMX_SRI"
check "$work/uplot-$UPLOT.tgz" "$UPLOT_SRI"
mkdir -p "$work/h" "$work/u"
tar xzf "$work/htmx.org-$HTMX.tgz" -C "$work/h"
tar xzf "$work/uplot-$UPLOT.tgz" -C "$work/u"
cp "$work/h/package/dist/htmx.min.js" "$out/htmx.min.js"
cp "$work/h/package/LICENSE" "$out/htmx.LICENSE"
cp "$work/u/package/dist/uPlot.iife.min.js" "$out/uplot.min.js"
cp "$work/u/package/dist/uPlot.min.css" "$out/uplot.min.css"
cp "$work/u/package/LICENSE" "$out/uplot.LICENSE"
(cd "$out" && sha256sum htmx.min.js uplot.min.js uplot.min.css)
