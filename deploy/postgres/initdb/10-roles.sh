#!/bin/sh
# First start of the compose PostgreSQL only (docker-entrypoint-initdb.d): the application role and
# its database. Passwords come from Docker secrets; the server stores them as SCRAM-SHA-256
# verifiers (compose starts it with password_encryption=scram-sha-256, which this script's
# temporary server gets too), and PgBouncer's SCRAM login then matches them.
set -eu
app_password=$(cat "${APP_DB_PASSWORD_FILE:?APP_DB_PASSWORD_FILE is not set}")
[ -n "$app_password" ] || { echo "APP_DB_PASSWORD is empty: set it in .env" >&2; exit 64; }
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v app_user="${APP_DB_USER:-app}" -v app_db="${APP_DB_NAME:-app}" -v app_password="$app_password" <<'SQL'
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password';
CREATE DATABASE :"app_db" OWNER :"app_user";
SQL
