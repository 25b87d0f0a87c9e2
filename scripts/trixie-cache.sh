# Sourced by get-pgbouncer-current.sh and get-postgres-17.sh: what both need to keep programs
# from Debian trixie's packages in a private folder that root later runs.

# untrusted DIR: prints what in DIR, or in a folder above it, a user other than root or this one
# could have changed (the same rule as asyncpool.testing.binaries.untrusted_paths). Root is about
# to run what is there.
untrusted() {
  local p=$1 owner mode me
  me=$(id -u)
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

# refuse_untrusted DIR: exits (status 1) saying why when untrusted DIR finds anything.
refuse_untrusted() {
  local problems
  problems=$(untrusted "$1")
  if [ -n "$problems" ]; then
    echo "refusing to use $1: someone else could change what runs from it:" >&2
    echo "$problems" | head -5 >&2
    echo "remove it (this script fetches it again) or fix the ownership" >&2
    exit 1
  fi
}

# make_cache DEST OVERRIDDEN: makes DEST, which the unprivileged server user must be able to reach
# and run from whatever the umask; as root, with OVERRIDDEN empty (the default location), its
# parent /var/cache/asyncpool too. An overridden location's parent is the user's: left alone.
make_cache() {
  if [ -z "$2" ] && [ "$(id -u)" -eq 0 ]; then
    mkdir -p /var/cache/asyncpool
    chmod 755 /var/cache/asyncpool
  fi
  mkdir -p "$1"
  chmod 755 "$1"
}

# trixie_apt_options LISTS WORK: sets the array trixie_opts to apt-get options that read
# trixie's package lists into LISTS and keep everything else under WORK, from the Debian mirror
# apt already uses; nothing of the system's apt state is changed.
trixie_apt_options() {
  local lists=$1 work=$2 uri
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || { echo "cannot find the Debian mirror apt uses" >&2; exit 1; }
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$work/trixie.list"
  mkdir -p "$lists/partial" "$work/cache/archives/partial"
  trixie_opts=(-oDir::Etc::SourceList="$work/trixie.list" -oDir::Etc::SourceParts=/dev/null
               -oDir::State::Lists="$lists" -oDir::Cache="$work/cache" -oAPT::Sandbox::User=root)
}

# trixie_update: reads trixie's package lists (after trixie_apt_options); exits (status 1) with
# a clear message when the mirror cannot be reached (apt-get update alone only warns).
trixie_update() {
  if ! apt-get "${trixie_opts[@]}" -qq --error-on=any update >&2; then
    echo "cannot read Debian trixie's package lists from the Debian mirror (is the package registry" \
      "reachable from this machine?)" >&2
    exit 1
  fi
}
