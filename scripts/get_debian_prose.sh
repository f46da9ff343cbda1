#!/usr/bin/env bash
# Puts FOLDOC and the Jargon File, as Debian's dict-foldoc and dict-jargon packages ship them (dictd databases, with
# their copyright files), in .cache/debian_prose, without root and without installing the dictd server those
# packages depend on. Then: `clara prose --source foldoc --root .cache/debian_prose`, or the study's
# `--prose_source foldoc --prose_root .cache/debian_prose`. Needs apt-get and dpkg-deb (Debian and its derivatives).
set -euo pipefail
cd "$(dirname "$0")/.."
target=.cache/debian_prose
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
download() { (cd "$work" && apt-get download -qq dict-foldoc dict-jargon); }
# A machine whose package lists were never fetched knows no candidate version; only root can fetch them.
download 2>/dev/null || { [ "$(id -u)" = 0 ] && apt-get update -qq && download; } || {
    echo "get_debian_prose.sh: apt-get could not download dict-foldoc and dict-jargon (as root it also tried apt-get update)." >&2
    exit 1
}
mkdir -p "$target"
for name in foldoc jargon; do
    dpkg-deb -x "$work"/dict-"$name"_*.deb "$work/$name"
    cp "$work/$name"/usr/share/dictd/"$name".{index,dict.dz} "$target"/
    cp "$work/$name"/usr/share/doc/dict-"$name"/copyright "$target/$name.copyright"
done
echo "FOLDOC and the Jargon File are in $target:" && ls "$target"
