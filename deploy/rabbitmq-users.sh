#!/bin/sh
# Creates Ebb's RabbitMQ users through the management API, least privilege for each role, in one vhost
# (created if missing). Idempotent: run it on every deploy.
# Needs: RABBITMQ_URL (http://host:15672), RABBITMQ_ADMIN_USER/PASSWORD (an administrator),
# EBB_CALLER_PASSWORD, EBB_WORKER_PASSWORD, EBB_MONITOR_PASSWORD; curl and python3.
# Optional: RABBITMQ_VHOST (default /; the vhost EBB_BROKER_URL names, decoded: ebb%2Fprod is ebb/prod);
# EBB_CALLER_USER, EBB_WORKER_USER, EBB_MONITOR_USER (default ebb-caller, ebb-worker, ebb-monitor):
# users are broker-wide, permissions per vhost, so deployments that share a broker take their own names;
# EBB_TLS_CA_FILE (a PEM bundle that signed an https:// RABBITMQ_URL).
# No password reaches a command line: curl reads them on stdin (deploy/management.sh).
set -eu
: "${EBB_CALLER_PASSWORD:?set EBB_CALLER_PASSWORD}" "${EBB_WORKER_PASSWORD:?set EBB_WORKER_PASSWORD}"
: "${EBB_MONITOR_PASSWORD:?set EBB_MONITOR_PASSWORD}"
. "$(dirname "$0")/management.sh"
caller=${EBB_CALLER_USER:-ebb-caller}
worker=${EBB_WORKER_USER:-ebb-worker}
monitor=${EBB_MONITOR_USER:-ebb-monitor}
# The vhost, unless it exists (then it is left as it is).
request GET -- vhosts "$vhost"
if [ "$status" = 404 ]; then api PUT --json '{}' -- vhosts "$vhost"; else succeeded GET -- vhosts "$vhost"; fi
# Callers: create/consume/delete their own job queues, publish tasks (default exchange).
api PUT --set-env password=EBB_CALLER_PASSWORD --set tags= -- users "$caller"
api PUT --set 'configure=^jobs\..+$' --set 'write=^amq\.default$' \
  --set 'read=^jobs\..+$' -- permissions "$vhost" "$caller"
# Workers: everything Celery needs, but never configure or read a job queue (so never re-create one).
api PUT --set-env password=EBB_WORKER_PASSWORD --set tags= -- users "$worker"
api PUT --set 'configure=^(?!jobs\.).*' --set 'write=.*' --set 'read=^(?!jobs\.).*' \
  -- permissions "$vhost" "$worker"
# The audit reads queues through the management API; deleting unexpiring queues needs configure on jobs.*.
api PUT --set-env password=EBB_MONITOR_PASSWORD --set tags=monitoring -- users "$monitor"
api PUT --set 'configure=^jobs\..+$' --set write= --set 'read=^jobs\..+$' -- permissions "$vhost" "$monitor"
echo "ebb users ready in vhost $vhost: $caller, $worker, $monitor"
