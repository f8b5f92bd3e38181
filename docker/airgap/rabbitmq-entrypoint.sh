#!/bin/sh
# Write the first user into the broker's config (read on a fresh node only), then start.
set -eu
: "${RABBITMQ_DEFAULT_USER:?set RABBITMQ_DEFAULT_USER}"
: "${RABBITMQ_DEFAULT_PASS:?set RABBITMQ_DEFAULT_PASS}"
umask 077
cat > "$RABBITMQ_CONFIG_FILE" <<CONF
default_user = $RABBITMQ_DEFAULT_USER
default_pass = $RABBITMQ_DEFAULT_PASS
CONF
exec "$@"
