"""Celery settings for Ebb workers, beat and Flower, all derived from ``EBB_*`` variables."""

from ebb import links
from ebb.config import Settings
from ebb.contract import task_queue

_settings = Settings.from_env()

broker_url = _settings.broker_url
# amqps:// (or a failover list of them): certificates and host names verified, EBB_TLS_* for a
# private CA and a client certificate; each broker checked against its own name (tasks.install).
if any(links.uses_tls(url) for url in links.broker_urls(_settings)):
    broker_use_ssl = links.amqp_ssl_options(_settings)
# Job results travel on the per-job queues; Redis holds the job registry, not Celery results.
result_backend = None
task_ignore_result = True
redis_url = _settings.redis_url

task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

task_queues = (task_queue(_settings.task_queue, _settings.task_queue_type),)
task_default_queue = _settings.task_queue
task_create_missing_queues = False

# Celery events cost RabbitMQ about a fifth of a job: workers send them only while someone
# watches. Flower turns them on by remote control (enable_events, every 5 s); set
# EBB_TASK_EVENTS=true to have them on from the start. No task-sent events (callers send none
# either): one from a job that then ran unwatched would leave Flower showing it PENDING for
# ever. Flower hears of a job from its worker, with its real state (tasks/final_events.py).
worker_send_task_events = _settings.task_events
task_send_sent_event = False
task_track_started = True

# A job is acknowledged only once it has run; a worker that dies hands it back to the queue.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

broker_connection_retry_on_startup = True

# The orphaned-queue audit (ebb.audit_queues, every EBB_AUDIT_INTERVAL s) is put on the beat
# schedule by tasks.install: `celery -A tasks worker -B` in development, `celery -A tasks beat`
# in production (one beat per deployment; several auditors would still not double-report).
worker_hijack_root_logger = True
