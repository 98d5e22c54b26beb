# The MLflow tracking server of infra/docker-compose.yml: the official image plus the PostgreSQL driver
# and boto3 (artifacts in S3), installed at build time rather than at every start.
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
RUN pip install --no-cache-dir "psycopg2-binary>=2.9" "boto3>=1.34"
