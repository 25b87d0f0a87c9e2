#!/bin/sh
# Renders PgBouncer's configuration from the environment and starts it (POSIX sh, busybox-safe).
#
# One script for every place asyncpool runs a PgBouncer, so they all get the same settings:
# compose.yaml (mounted as a file), the Terraform ECS module and asyncpool.testing.containers
# (passed inline to `sh -c`). The tuning (pool mode, limits, max_prepared_statements...) is NOT
# written here: it comes verbatim from asyncpool/testing/pgbouncer.ini, the one place it lives.
#
# Settings   PGBOUNCER_SETTINGS_FILE  path of that ini file (compose mounts it read-only), or
#            PGBOUNCER_SETTINGS       its text (ECS, testcontainers: no files to mount)
#            PGBOUNCER_OVERRIDES      optional "key = value" lines applied after the shared file
#                                     (the ECS module divides the server pool between its tasks)
# Backend    DB_HOST (required), DB_PORT (5432)
# Listener   PGBOUNCER_LISTEN_ADDR (0.0.0.0), PGBOUNCER_LISTEN_PORT (6432)
# Users      APP_DB_USER (app) with APP_DB_PASSWORD; PGBOUNCER_STATS_USER (pgb_stats) with
#            PGBOUNCER_STATS_PASSWORD (optional): a read-only console user (SHOW only: for doctor
#            and metrics exporters). No admin user (PAUSE, KILL, SHUTDOWN from any client that
#            reaches the listener) unless both PGBOUNCER_ADMIN_USER and PGBOUNCER_ADMIN_PASSWORD
#            are set. Each *_PASSWORD may instead be read from the file named by *_PASSWORD_FILE
#            (compose/Docker secrets).
# TLS        PGBOUNCER_TLS_CERT and PGBOUNCER_TLS_KEY (PEM text, or *_FILE): clients must then
#            use TLS (PGBOUNCER_CLIENT_TLS_SSLMODE, default require).
#            PgBouncer -> PostgreSQL: PGBOUNCER_SERVER_TLS_SSLMODE, default verify-full, which
#            needs PGBOUNCER_SERVER_TLS_CA (PEM, or *_FILE: for RDS the regional bundle). PgBouncer
#            holds plain-text passwords, so anything weaker must be asked for by name
#            (disable/allow/prefer/require: a local database without TLS, as compose.yaml does).
# Output     PGBOUNCER_CONF_DIR (/tmp/pgbouncer): rendered files, private to the user (umask 077).
# Then runs "$@" (default: pgbouncer) with the rendered pgbouncer.ini as its last argument.
set -eu
umask 077

fail() {
    echo "pgbouncer entrypoint: $*" >&2
    exit 64
}

# value NAME: $NAME, or the contents of the file named by $NAME_FILE (trailing newlines dropped).
value() {
    eval "_file=\${$1_FILE:-}"
    if [ -n "$_file" ]; then
        [ -r "$_file" ] || fail "$1_FILE=$_file is not a readable file"
        cat "$_file"
    else
        eval "printf '%s' \"\${$1:-}\""
    fi
}

conf_dir=${PGBOUNCER_CONF_DIR:-/tmp/pgbouncer}
mkdir -p "$conf_dir"
conf="$conf_dir/pgbouncer.ini"

if [ -n "${PGBOUNCER_SETTINGS_FILE:-}" ]; then
    [ -r "$PGBOUNCER_SETTINGS_FILE" ] || fail "PGBOUNCER_SETTINGS_FILE=$PGBOUNCER_SETTINGS_FILE is not readable"
    settings=$PGBOUNCER_SETTINGS_FILE
elif [ -n "${PGBOUNCER_SETTINGS:-}" ]; then
    settings="$conf_dir/settings.ini"
    printf '%s\n' "$PGBOUNCER_SETTINGS" > "$settings"
else
    fail "set PGBOUNCER_SETTINGS_FILE (or PGBOUNCER_SETTINGS) to asyncpool/testing/pgbouncer.ini"
fi

[ -n "${DB_HOST:-}" ] || fail "DB_HOST is not set"
app_user=${APP_DB_USER:-app}
app_password=$(value APP_DB_PASSWORD)
[ -n "$app_password" ] || fail "APP_DB_PASSWORD (or APP_DB_PASSWORD_FILE) is empty"
stats_user=${PGBOUNCER_STATS_USER:-pgb_stats}
stats_password=$(value PGBOUNCER_STATS_PASSWORD)
admin_user=${PGBOUNCER_ADMIN_USER:-}
admin_password=$(value PGBOUNCER_ADMIN_PASSWORD)
if [ -n "$admin_user" ] && [ -z "$admin_password" ]; then
    fail "PGBOUNCER_ADMIN_USER is set but PGBOUNCER_ADMIN_PASSWORD (or _FILE) is empty"
fi
if [ -z "$admin_user" ] && [ -n "$admin_password" ]; then
    fail "PGBOUNCER_ADMIN_PASSWORD is set without PGBOUNCER_ADMIN_USER: name the admin user explicitly (or use PGBOUNCER_STATS_USER for a read-only console user)"
fi
if [ -n "$admin_user" ] && [ "$admin_user" = "$stats_user" ] && [ -n "$stats_password" ]; then
    fail "PGBOUNCER_ADMIN_USER and PGBOUNCER_STATS_USER are the same user"
fi
server_sslmode=${PGBOUNCER_SERVER_TLS_SSLMODE:-verify-full}
case "$server_sslmode" in
    disable|allow|prefer|require|verify-ca|verify-full) ;;
    *) fail "PGBOUNCER_SERVER_TLS_SSLMODE=$server_sslmode is not a PgBouncer sslmode" ;;
esac

# auth_file: plain-text passwords, so PgBouncer can run SCRAM-SHA-256 both with its clients and
# with PostgreSQL. A double quote inside a password is written twice (PgBouncer's quoting).
quote() { printf '"%s"' "$(printf '%s' "$1" | sed 's/"/""/g')"; }
{
    printf '%s %s\n' "$(quote "$app_user")" "$(quote "$app_password")"
    if [ -n "$stats_password" ]; then
        printf '%s %s\n' "$(quote "$stats_user")" "$(quote "$stats_password")"
    fi
    if [ -n "$admin_user" ]; then
        printf '%s %s\n' "$(quote "$admin_user")" "$(quote "$admin_password")"
    fi
} > "$conf_dir/userlist.txt"

tls_cert=$(value PGBOUNCER_TLS_CERT)
tls_key=$(value PGBOUNCER_TLS_KEY)
server_ca=$(value PGBOUNCER_SERVER_TLS_CA)
case "$server_sslmode" in
    verify-ca|verify-full)
        [ -n "$server_ca" ] || fail "PGBOUNCER_SERVER_TLS_SSLMODE=$server_sslmode needs PGBOUNCER_SERVER_TLS_CA (or _FILE): the CA bundle that signs the database's certificate (for RDS, the regional bundle). For a local database without TLS set PGBOUNCER_SERVER_TLS_SSLMODE=disable explicitly." ;;
esac

{
    # Order matters: PgBouncer resets every [pgbouncer] setting to its default each time it meets
    # a "[pgbouncer]" header, and the shared file starts with one. So the shared file comes first,
    # then the settings of this deployment (same section, no new header), then [databases].
    echo "; Rendered by deploy/pgbouncer/entrypoint.sh: do not edit, change the environment."
    echo "; The shared tuning, verbatim (it opens the [pgbouncer] section):"
    echo "%include $settings"
    echo "; This deployment:"
    echo "listen_addr = ${PGBOUNCER_LISTEN_ADDR:-0.0.0.0}"
    echo "listen_port = ${PGBOUNCER_LISTEN_PORT:-6432}"
    echo "unix_socket_dir ="
    echo "auth_file = $conf_dir/userlist.txt"
    # Both lists are always written: the shared file must not be able to grant console access.
    stats_users=
    [ -n "$stats_password" ] && stats_users=$stats_user
    echo "stats_users = $stats_users"
    echo "admin_users = $admin_user"
    if [ -n "$tls_cert" ] || [ -n "$tls_key" ]; then
        [ -n "$tls_cert" ] && [ -n "$tls_key" ] || fail "set both PGBOUNCER_TLS_CERT and PGBOUNCER_TLS_KEY"
        printf '%s\n' "$tls_cert" > "$conf_dir/client.crt"
        printf '%s\n' "$tls_key" > "$conf_dir/client.key"
        echo "client_tls_sslmode = ${PGBOUNCER_CLIENT_TLS_SSLMODE:-require}"
        echo "client_tls_cert_file = $conf_dir/client.crt"
        echo "client_tls_key_file = $conf_dir/client.key"
    fi
    echo "server_tls_sslmode = $server_sslmode"
    if [ -n "$server_ca" ]; then
        printf '%s\n' "$server_ca" > "$conf_dir/server-ca.pem"
        echo "server_tls_ca_file = $conf_dir/server-ca.pem"
    fi
    if [ -n "${PGBOUNCER_OVERRIDES:-}" ]; then
        echo "; Overrides of the shared tuning (PGBOUNCER_OVERRIDES); the last value of a key wins:"
        printf '%s\n' "$PGBOUNCER_OVERRIDES" | grep -v '^[[:space:]]*\[' || true
    fi
    echo "[databases]"
    echo "* = host=$DB_HOST port=${DB_PORT:-5432}"
} > "$conf"

if [ "$#" -eq 0 ]; then
    set -- pgbouncer
fi
exec "$@" "$conf"
