#!/usr/bin/env bash
# Puts FOLDOC and the Jargon File, as Debian's dict-foldoc and dict-jargon packages ship them (dictd databases, with
# their copyright files), in .cache/debian_prose, without root and without installing the dictd server those
# packages depend on. Then: `clara prose --source foldoc --root .cache/debian_prose`, or the study's
# `--prose_source foldoc --prose_root .cache/debian_prose`. Also Python's documentation, the reStructuredText sources
# that python3-doc installs (each file gzipped: 3.3 MB), in .cache/debian_prose/python-docs, with its copyright file:
# `--prose_source python-docs --prose_root .cache/debian_prose/python-docs`. Needs apt-get and dpkg-deb (Debian and
# its derivatives).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.cache/debian_prose
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download() {
    # python3-doc only links to the documentation of the release's Python, python3.X-doc, which holds it.
    docs=$(apt-cache depends python3-doc | sed -n 's/^ *Depends: \(python3\.[0-9]*-doc\)$/\1/p' | head -n 1)
    [ -n "$docs" ] && (cd "$work" && apt-get download -qq dict-foldoc dict-jargon "$docs")
}
# A machine whose package lists were never fetched knows no candidate version; only root can fetch them.
download 2>/dev/null || { [ "$(id -u)" = 0 ] && apt-get update -qq && download; } || {
    echo "get_debian_prose.sh: apt-get could not download dict-foldoc, dict-jargon and python3-doc's python3.X-doc (as root it also tried apt-get update)." >&2
    exit 1
}
mkdir -p "$target"
for name in foldoc jargon; do
    dpkg-deb -x "$work"/dict-"$name"_*.deb "$work/$name"
    cp "$work/$name"/usr/share/dictd/"$name".{index,dict.dz} "$target"/
    cp "$work/$name"/usr/share/doc/dict-"$name"/copyright "$target/$name.copyright"
done
dpkg-deb -x "$work"/python3.*-doc_*.deb "$work/docs"
rm -rf "$target/python-docs"
cp -r "$work"/docs/usr/share/doc/python3.*-doc/html/_sources "$target/python-docs"  # html: a link to ../python3.X/html
gzip -9 -n -r "$target/python-docs"
cp "$work"/docs/usr/share/doc/python3.*-doc/copyright "$target/python-docs.copyright"
echo "FOLDOC, the Jargon File and Python's documentation are in $target:" && ls "$target"
