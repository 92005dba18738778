#!/bin/sh
# Creates Ebb's RabbitMQ users through the management API, least privilege for each role.
# Needs: RABBITMQ_URL (http://host:15672), RABBITMQ_ADMIN_USER/PASSWORD, EBB_CALLER_PASSWORD,
# EBB_WORKER_PASSWORD, EBB_MONITOR_PASSWORD. Idempotent: run it on every deploy.
set -eu
api() { curl -fsS -u "$RABBITMQ_ADMIN_USER:$RABBITMQ_ADMIN_PASSWORD" -H 'content-type: application/json' -X PUT "$RABBITMQ_URL/api/$1" -d "$2"; }
vhost=%2F
# Callers: create/consume/delete their own job queues, publish tasks (default exchange) and sent-events.
api users/ebb-caller "{\"password\":\"$EBB_CALLER_PASSWORD\",\"tags\":\"\"}"
api "permissions/$vhost/ebb-caller" '{"configure":"^(jobs\\..+|celeryev)$","write":"^(amq\\.default|celeryev)$","read":"^jobs\\..+$"}'
# Workers: everything Celery needs, but never configure or read a job queue (so never re-create one).
api users/ebb-worker "{\"password\":\"$EBB_WORKER_PASSWORD\",\"tags\":\"\"}"
api "permissions/$vhost/ebb-worker" '{"configure":"^(?!jobs\\.).*","write":".*","read":"^(?!jobs\\.).*"}'
# The audit reads queues through the management API; deleting unexpiring queues needs configure on jobs.*.
api users/ebb-monitor "{\"password\":\"$EBB_MONITOR_PASSWORD\",\"tags\":\"monitoring\"}"
api "permissions/$vhost/ebb-monitor" '{"configure":"^jobs\\..+$","write":"","read":"^jobs\\..+$"}'
echo "ebb users ready"
