#!/usr/bin/env bash
# Fetches a current PgBouncer (>= 1.21, prepared-statement support) from Debian trixie's packages and
# unpacks it, with the runtime libraries and dynamic loader it was built against, into a private
# folder (/var/cache/asyncpool as root, .cache/ in the repo otherwise). Nothing is installed
# system-wide. Prints the path of the launcher script on success.
# Cached: a second run with the launcher already present does nothing.
set -euo pipefail
root_dir=$(cd "$(dirname "$0")/.." && pwd)
# As root the servers run as the `postgres` user, which must be able to reach the binary: a clone
# may sit in a directory only root can enter (mktemp -d), so root keeps it in /var/cache.
if [ "$(id -u)" -eq 0 ]; then default_dest=/var/cache/asyncpool/pgbouncer-trixie
else default_dest=$root_dir/.cache/pgbouncer-trixie; fi
dest=${ASYNCPOOL_PGBOUNCER_CACHE:-$default_dest}
launcher=$dest/pgbouncer

# shellcheck source=trixie-cache.sh
source "$root_dir/scripts/trixie-cache.sh"
refuse_untrusted "$dest"
if [ -x "$launcher" ] && "$launcher" --version >/dev/null 2>&1; then
  echo "$launcher"; exit 0
fi
make_cache "$dest" "${ASYNCPOOL_PGBOUNCER_CACHE:-}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
lists=$dest/lists
mkdir -p "$lists/partial" "$work/debs" "$dest/root"
trixie_apt_options "$lists" "$work"
trixie_update
(cd "$work/debs" && apt-get "${trixie_opts[@]}" -qq download pgbouncer libc6 libcares2 libevent-2.1-7t64 \
  libssl3t64 libsystemd0 libpam0g libcap2 libgcrypt20 liblz4-1 liblzma5 libzstd1 libgpg-error0 \
  libaudit1 libcap-ng0 >&2)
for f in "$work"/debs/*.deb; do dpkg -x "$f" "$dest/root"; done
cat > "$launcher" <<LAUNCH
#!/bin/sh
# Runs trixie's pgbouncer through trixie's own loader and libraries.
r="$dest/root"
exec "\$r/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "\$r/usr/lib/x86_64-linux-gnu" "\$r/usr/sbin/pgbouncer" "\$@"
LAUNCH
chmod +x "$launcher"
chmod -R a+rX "$dest"
"$launcher" --version >&2
echo "$launcher"
