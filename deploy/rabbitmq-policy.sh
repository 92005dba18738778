#!/bin/sh
# The expiry safety net: an operator policy that gives every jobs.* queue an expiry, so that even a
# queue declared without x-expires (by hand, or by an old client) goes away once unused. RabbitMQ
# applies the smaller of the policy's expires and the queue's own x-expires, so callers' TTLs up to
# EBB_MAX_TTL are untouched. Idempotent: run it on every deploy, through the management API.
# Needs: RABBITMQ_URL (http://host:15672), RABBITMQ_ADMIN_USER/PASSWORD (a policymaker or admin).
# Optional: EBB_MAX_TTL (seconds, default 604800 = 7 days), RABBITMQ_VHOST (default /),
# POLICY_NAME (ebb-job-queues), POLICY_PATTERN (^jobs\.), POLICY_PRIORITY (0).
set -eu
max_ttl=${EBB_MAX_TTL:-604800}
case $max_ttl in '' | *[!0-9.]*) echo "EBB_MAX_TTL=$max_ttl is not a number of seconds" >&2; exit 2 ;; esac
expires_ms=$(awk -v s="$max_ttl" 'BEGIN { printf "%d", s * 1000 }')
vhost=$(printf '%s' "${RABBITMQ_VHOST:-/}" | sed 's|%|%25|g; s|/|%2F|g')
name=${POLICY_NAME:-ebb-job-queues}
pattern=$(printf '%s' "${POLICY_PATTERN:-^jobs\\.}" | sed 's|\\|\\\\|g')
curl -fsS -u "$RABBITMQ_ADMIN_USER:$RABBITMQ_ADMIN_PASSWORD" -H 'content-type: application/json' \
  -X PUT "$RABBITMQ_URL/api/operator-policies/$vhost/$name" \
  -d "{\"pattern\":\"$pattern\",\"definition\":{\"expires\":$expires_ms},\"apply-to\":\"queues\",\"priority\":${POLICY_PRIORITY:-0}}"
echo "operator policy $name: queues matching ${POLICY_PATTERN:-^jobs\\.} expire at most ${max_ttl} s after last use"
