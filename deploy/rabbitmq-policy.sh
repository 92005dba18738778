#!/bin/sh
# The expiry safety net: an operator policy that gives every jobs.* queue an expiry, so that even a
# queue declared without x-expires (by hand, or by an old client) goes away once unused. RabbitMQ
# applies the smaller of the policy's expires and the queue's own x-expires, so callers' TTLs up to
# EBB_MAX_TTL are untouched. Idempotent: run it on every deploy, through the management API.
# Needs: RABBITMQ_URL (http://host:15672), RABBITMQ_ADMIN_USER/PASSWORD (an administrator); curl, python3.
# Optional: EBB_MAX_TTL (seconds, default 604800 = 7 days), RABBITMQ_VHOST (default /; the vhost
# EBB_BROKER_URL names, decoded), POLICY_NAME (ebb-job-queues), POLICY_PATTERN (^jobs\.),
# POLICY_PRIORITY (0), EBB_TLS_CA_FILE (a PEM bundle that signed an https:// RABBITMQ_URL).
# The admin password reaches no command line: curl reads it on stdin (deploy/management.sh).
set -eu
max_ttl=${EBB_MAX_TTL:-604800}
case $max_ttl in '' | *[!0-9.]*) echo "EBB_MAX_TTL=$max_ttl is not a number of seconds" >&2; exit 2 ;; esac
expires_ms=$(awk -v s="$max_ttl" 'BEGIN { printf "%d", s * 1000 }')
priority=${POLICY_PRIORITY:-0}
case ${priority#-} in '' | *[!0-9]*) echo "POLICY_PRIORITY=$priority is not an integer" >&2; exit 2 ;; esac
name=${POLICY_NAME:-ebb-job-queues}
pattern=${POLICY_PATTERN:-'^jobs\.'}
. "$(dirname "$0")/management.sh"
request GET -- vhosts "$vhost"
if [ "$status" = 404 ]; then
  echo "rabbitmq-policy.sh: no vhost $vhost on $RABBITMQ_URL: deploy/rabbitmq-users.sh creates it" >&2
  exit 1
fi
succeeded GET -- vhosts "$vhost"
api PUT --set "pattern=$pattern" --set apply-to=queues \
  --json "{\"definition\":{\"expires\":$expires_ms},\"priority\":$priority}" \
  -- operator-policies "$vhost" "$name"
echo "operator policy $name in vhost $vhost: queues matching $pattern expire within $max_ttl s of last use"
