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
me=$(id -u)

# untrusted PATH: prints what in PATH, or in a folder above it, a user other than root or this one
# could have changed (the same rule as asyncpool.testing.binaries.untrusted_paths). Root is about
# to run what is there.
untrusted() {
  local p=$1 owner mode
  while p=$(dirname "$p"); do
    # a folder not made yet (a fresh machine) is made below by this user
    if [ ! -e "$p" ]; then [ "$p" = / ] && break; continue; fi
    read -r owner mode < <(stat -c '%u %a' "$p")
    mode=$((8#$mode))
    if [ "$owner" != 0 ] && [ "$owner" != "$me" ]; then echo "$p: owned by uid $owner"; fi
    if (( (mode & 8#022) != 0 && (mode & 8#1000) == 0 )); then echo "$p: writable by group or others"; fi
    [ "$p" = / ] && break
  done
  [ -e "$1" ] || return 0
  find "$1" ! -type l \( \( ! -uid 0 ! -uid "$me" \) -o -perm /022 \) -printf '%p: not owned by root or uid '"$me"', or writable by group or others\n'
}
problems=$(untrusted "$dest")
if [ -n "$problems" ]; then
  echo "refusing to use $dest: someone else could change what runs from it:" >&2
  echo "$problems" | head -5 >&2
  echo "remove it (this script fetches it again) or fix the ownership" >&2
  exit 1
fi
if [ -x "$launcher" ] && "$launcher" --version >/dev/null 2>&1; then
  echo "$launcher"; exit 0
fi
if [ -z "${ASYNCPOOL_PGBOUNCER_CACHE:-}" ] && [ "$me" -eq 0 ]; then
  # Our own folder: the unprivileged server user must be able to reach and run it whatever the
  # umask. An overridden location's parent is the user's: its permissions are left alone.
  mkdir -p /var/cache/asyncpool
  chmod 755 /var/cache/asyncpool
fi
mkdir -p "$dest"
chmod 755 "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
lists=$dest/lists
mkdir -p "$lists/partial" "$work/debs" "$dest/root"
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$uri" ] || { echo "cannot find the Debian mirror apt uses" >&2; exit 1; }
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$work/trixie.list"
opts=(-oDir::Etc::SourceList="$work/trixie.list" -oDir::Etc::SourceParts=/dev/null -oDir::State::Lists="$lists"
      -oDir::Cache="$work/cache" -oAPT::Sandbox::User=root)
mkdir -p "$work/cache/archives/partial"
apt-get "${opts[@]}" -qq update >&2
(cd "$work/debs" && apt-get "${opts[@]}" -qq download pgbouncer libc6 libcares2 libevent-2.1-7t64 \
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
