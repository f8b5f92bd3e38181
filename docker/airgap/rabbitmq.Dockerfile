# RabbitMQ from Debian's packages, configured as the official image is: the first user
# from RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS, logs to stdout, data in a volume.
ARG DEBIAN_IMAGE=microshop-smoke/debian:bookworm
FROM ${DEBIAN_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* /var/lib/rabbitmq/mnesia
COPY rabbitmq-entrypoint.sh /usr/local/bin/rabbitmq-entrypoint
ENV PATH=/usr/lib/rabbitmq/bin:$PATH \
    HOME=/var/lib/rabbitmq \
    RABBITMQ_CONFIG_FILE=/var/lib/rabbitmq/rabbitmq.conf \
    RABBITMQ_LOGS=-
USER rabbitmq
WORKDIR /var/lib/rabbitmq
EXPOSE 5672
ENTRYPOINT ["rabbitmq-entrypoint"]
CMD ["rabbitmq-server"]
