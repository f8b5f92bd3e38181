# A Python base from Debian's packages, for docker/Dockerfile's BASE_IMAGE where no image
# registry is reachable (docker/smoke builds it on a debootstrap'ed Debian).
ARG DEBIAN_IMAGE=microshop-smoke/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]
