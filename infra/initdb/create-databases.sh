#!/bin/sh
# Runs once, when the postgres volume is empty: POSTGRES_DB (MLflow's) exists already; create Prefect's.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE "${PREFECT_DB}";
SQL
