#!/usr/bin/env bash
# Install (Debian package) and start a local PostgreSQL for the multi-worker tuning tests, with a
# role and database of their own. Prints the URL the tests read from LIGHTNING_BATCH_TEST_POSTGRES.
# Idempotent: a second call finds everything in place.
set -euo pipefail
if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -1)
if ! pg_lsclusters -h | grep -q "^$version main"; then
    pg_createcluster "$version" main >&2
fi
pg_ctlcluster "$version" main start >&2 2>/dev/null || true  # already running is fine
for _ in $(seq 30); do
    pg_isready -q -h 127.0.0.1 && break
    sleep 1
done
as_postgres() { su postgres -c "$1"; }
# A password unlike any other string in a run, so a test can grep for it (tests/test_secrets.py).
password=lb-pg-secret-7c2e
if ! as_postgres "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='lightning_batch'\"" | grep -q 1; then
    as_postgres "psql -q -c \"CREATE ROLE lightning_batch LOGIN\"" >&2
fi
as_postgres "psql -q -c \"ALTER ROLE lightning_batch PASSWORD '$password'\"" >&2
# lightning_batch_test for Optuna's studies, lightning_batch_mlflow for an MLflow store (each tool
# keeps its schema version in a table named alembic_version: they cannot share a database).
for database in lightning_batch_test lightning_batch_mlflow; do
    if ! as_postgres "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='$database'\"" | grep -q 1; then
        as_postgres "createdb -O lightning_batch $database" >&2
    fi
done
echo "postgresql://lightning_batch:$password@127.0.0.1:5432/lightning_batch_test"
