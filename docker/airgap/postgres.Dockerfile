# PostgreSQL from Debian's packages, set up as the official image is: on an empty data
# folder, a superuser POSTGRES_USER with POSTGRES_PASSWORD and a database POSTGRES_DB.
ARG DEBIAN_IMAGE=microshop-smoke/debian:bookworm
FROM ${DEBIAN_IMAGE}
# the entrypoint makes the cluster; the package's own "main" cluster would go unused
RUN mkdir -p /etc/postgresql-common \
 && echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres -m 2775 /var/run/postgresql
COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
ENV PATH=/usr/lib/postgresql/15/bin:$PATH \
    PGDATA=/var/lib/postgresql/data
USER postgres
EXPOSE 5432
ENTRYPOINT ["postgres-entrypoint"]
CMD ["postgres", "-c", "listen_addresses=*"]
