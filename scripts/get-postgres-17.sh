#!/usr/bin/env bash
# Fetches PostgreSQL 17's server from Debian trixie's packages (bookworm has only 15, and no
# backport) and unpacks it, with the runtime libraries and dynamic loader it was built against, into
# a private folder (/var/cache/asyncpool as root, .cache/ in the repo otherwise). Nothing is
# installed system-wide. Prints the directory holding `initdb` and `postgres` on success: the
# test harness runs PostgreSQL 17 with ASYNCPOOL_PG_BINDIR set to it.
# Cached: a second run with the binaries already present does nothing.
#
# Trixie's programs need trixie's glibc, so each one in bin/ is a launcher running the real one
# (bin/NAME.real) through trixie's loader and libraries. The real ones stay in bin/, in the
# package's layout: PostgreSQL finds its share/ and lib/ folders relative to its own path, and
# initdb runs the `postgres` next to it (the launcher). JIT is left out (llvmjit.so needs LLVM,
# 100 MB more): without its provider PostgreSQL runs every query without JIT.
set -euo pipefail
root_dir=$(cd "$(dirname "$0")/.." && pwd)
major=17
# As root the servers run as the `postgres` user, which must be able to reach the binaries: a
# clone may sit in a directory only root can enter (mktemp -d), so root keeps them in /var/cache.
if [ "$(id -u)" -eq 0 ]; then default_dest=/var/cache/asyncpool/postgresql-$major-trixie
else default_dest=$root_dir/.cache/postgresql-$major-trixie; fi
dest=${ASYNCPOOL_PG17_CACHE:-$default_dest}
bindir=$dest/root/usr/lib/postgresql/$major/bin

# shellcheck source=trixie-cache.sh
source "$root_dir/scripts/trixie-cache.sh"
refuse_untrusted "$dest"
works() { "$bindir/postgres" --version && "$bindir/initdb" --version; } >/dev/null 2>&1
if [ -x "$bindir/postgres" ] && works; then
  echo "$bindir"; exit 0
fi
make_cache "$dest" "${ASYNCPOOL_PG17_CACHE:-}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Unpacked beside the cache and moved in whole: an interrupted run leaves no half-made root.
root=$dest/root
new=$dest/root.partial
mkdir -p "$work/debs"
trixie_apt_options "$work/lists" "$work"
trixie_update
# postgresql-$major's Depends: that are libraries, and theirs (the launchers' check below fails
# if a library is missing here).
(cd "$work/debs" && apt-get "${trixie_opts[@]}" -qq download "postgresql-$major" libpq5 libc6 \
  libgcc-s1 libstdc++6 libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 \
  libkeyutils1 libicu76 libldap2 libsasl2-2 liblz4-1 libpam0g libaudit1 libcap-ng0 libselinux1 \
  libpcre2-8-0 libssl3t64 libsystemd0 libcap2 libgcrypt20 liblzma5 libzstd1 libgpg-error0 libuuid1 \
  libxml2 libxslt1.1 zlib1g libxxhash0 >&2)
rm -rf "$new"
mkdir "$new"
for f in "$work"/debs/*.deb; do dpkg -x "$f" "$new"; done
rm -rf "$new/usr/share/doc" "$new/usr/share/man" "$new/usr/share/locale" \
  "$new/usr/lib/postgresql/$major/lib/llvmjit"* "$new/usr/lib/postgresql/$major/lib/bitcode"
libs=$new/usr/lib/x86_64-linux-gnu
loader=$libs/ld-linux-x86-64.so.2
# Every program and module must find all its libraries in the private root, none of this
# machine's (bookworm's glibc is older than trixie's programs need).
missing=$(for f in "$new/usr/lib/postgresql/$major/bin/"* "$new/usr/lib/postgresql/$major/lib/"*.so; do
  "$loader" --library-path "$libs" --list "$f" 2>&1 | grep -e 'not found' -e '=> /' -e 'rror' \
    | grep -v "=> $new/" | sed "s|^|$(basename "$f"): |" || true
done)
if [ -n "$missing" ]; then
  echo "PostgreSQL $major's files need libraries not unpacked (add their packages to $0):" >&2
  echo "$missing" | head -10 >&2
  exit 1
fi
for prog in "$new/usr/lib/postgresql/$major/bin/"*; do
  name=$(basename "$prog")
  mv "$prog" "$prog.real"
  cat > "$prog" <<LAUNCH
#!/bin/sh
# Runs trixie's $name through trixie's own loader and libraries.
r="$root"
exec "\$r/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$r/usr/lib/x86_64-linux-gnu" "\$r/usr/lib/postgresql/$major/bin/$name.real" "\$@"
LAUNCH
  chmod 755 "$prog"
done
chmod -R a+rX,go-w "$new"
rm -rf "$root"
mv "$new" "$root"
"$bindir/postgres" --version >&2
works || { echo "PostgreSQL $major's launchers in $bindir do not run" >&2; exit 1; }
echo "$bindir"
