"""Every ``EBB_*`` environment variable is read here and nowhere else."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from urllib.parse import unquote, urlsplit

from ebb.errors import ConfigurationError

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_MANAGEMENT_URL = "http://127.0.0.1:15672"
DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:15692"


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number of seconds; set it to e.g. 3600") from None
    if value <= 0:
        raise ConfigurationError(f"{name}={raw!r} must be greater than 0 seconds")
    return value


def _count(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a whole number; set it to e.g. {default}") from None
    if value < 1:
        raise ConfigurationError(f"{name}={raw!r} must be at least 1")
    return value


def _choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = (environ.get(name) or "").strip().lower()
    if raw == "":
        return default
    if raw not in choices:
        raise ConfigurationError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    return raw


def _flag(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use true or false")


def _port(environ: Mapping[str, str], name: str) -> int | None:
    raw = (environ.get(name) or "").strip()
    if raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise ConfigurationError(
            f"{name}={raw!r} is not a TCP port; set it to a number from 1 to 65535 (e.g. 9540), "
            "or leave it unset to serve no metrics"
        )
    return value


def _readable_file(environ: Mapping[str, str], name: str) -> str | None:
    raw = (environ.get(name) or "").strip()
    if raw == "":
        return None
    try:
        with open(raw, "rb"):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"{name}={raw!r} cannot be read ({exc.strerror}); point it at a PEM file this process may read"
        ) from None
    return raw


#: Shares the audit can read a node in at once: one per hex digit a job id can start with.
MAX_AUDIT_STREAMS = 16


@dataclass(frozen=True)
class Settings:
    """Connection details and limits shared by callers, workers and operators."""

    broker_url: str = DEFAULT_BROKER_URL
    redis_url: str = DEFAULT_REDIS_URL
    management_url: str = DEFAULT_MANAGEMENT_URL
    management_user: str = "guest"
    management_password: str = "guest"
    #: rabbitmq_prometheus, every node's (a ``;`` list): where the audit reads consumer counts
    #: when the management statistics are off (deprecated in RabbitMQ 4).
    prometheus_url: str = DEFAULT_PROMETHEUS_URL
    default_ttl: timedelta = timedelta(hours=48)
    max_ttl: timedelta = timedelta(days=7)
    task_queue: str = "ebb.jobs"
    #: "classic", or "quorum" on a cluster (replicated: survives the loss of a node). Fixed when
    #: the task queue is first declared; changing it needs the queue deleted and re-declared.
    task_queue_type: str = "classic"
    #: Job queues: "classic" (cheapest, on the caller's node) or "quorum" (replicated on a
    #: cluster, survives the loss of a node, several times the broker's work per job).
    queue_type: str = "classic"
    workflow_modules: tuple[str, ...] = field(default_factory=tuple)
    heartbeat: float = 60.0
    broker_timeout: float = 30.0
    reconnect_timeout: float = 120.0
    keep_results: int = 1000
    keep_results_bytes: int = 16 * 1024 * 1024
    max_attempts: int = 3
    check_workflows: bool = True
    max_params_bytes: int = 1_048_576
    #: The largest encoded result a worker publishes: at most the broker's max_message_size
    #: (16 MiB by default on RabbitMQ 4, 128 MiB on 3.10). A larger output ends the job ERROR.
    max_result_bytes: int = 16 * 1024 * 1024
    #: How long a worker keeps trying to publish a result the broker nacks, or returns while the
    #: node holding its queue is down, before it records the result as undelivered.
    result_retry: float = 120.0
    registry_grace: timedelta = timedelta(days=7)
    audit_interval: float = 300.0
    audit_delete_unexpiring: bool = False
    #: Prometheus reads at once per RabbitMQ 4.3+ node, each for a share of the job queues: one
    #: answer is rendered by one Erlang process, so one read uses one of the node's cores.
    audit_streams: int = 2
    task_events: bool = False
    #: TLS (``amqps://``, ``https://``, ``rediss://`` links): a PEM bundle of the CA(s) to trust
    #: instead of the system's store, and a client certificate and key for mutual TLS.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    #: Where a worker's or beat's main process serves Prometheus metrics (None: no metrics).
    metrics_port: int | None = None

    @property
    def vhost(self) -> str:
        """The RabbitMQ virtual host named by the broker URL (``/`` by default; the first URL
        of a failover list: every node of a cluster serves the same vhosts)."""
        path = urlsplit(self.broker_url.split(";")[0].strip()).path
        if path in ("", "/"):
            return "/"
        return unquote(path[1:])

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        default = cls()
        modules = tuple(m.strip() for m in env.get("EBB_WORKFLOW_MODULES", "").split(",") if m.strip())
        settings = cls(
            broker_url=env.get("EBB_BROKER_URL") or default.broker_url,
            redis_url=env.get("EBB_REDIS_URL") or default.redis_url,
            management_url=(env.get("EBB_MANAGEMENT_URL") or default.management_url).rstrip("/"),
            management_user=env.get("EBB_MANAGEMENT_USER") or default.management_user,
            management_password=env.get("EBB_MANAGEMENT_PASSWORD") or default.management_password,
            prometheus_url=env.get("EBB_PROMETHEUS_URL") or default.prometheus_url,
            default_ttl=timedelta(
                seconds=_seconds(env, "EBB_DEFAULT_TTL", default.default_ttl.total_seconds())
            ),
            max_ttl=timedelta(seconds=_seconds(env, "EBB_MAX_TTL", default.max_ttl.total_seconds())),
            task_queue=env.get("EBB_TASK_QUEUE") or default.task_queue,
            task_queue_type=_choice(
                env, "EBB_TASK_QUEUE_TYPE", default.task_queue_type, ("classic", "quorum")
            ),
            queue_type=_choice(env, "EBB_QUEUE_TYPE", default.queue_type, ("classic", "quorum")),
            workflow_modules=modules,
            heartbeat=_seconds(env, "EBB_HEARTBEAT", default.heartbeat),
            broker_timeout=_seconds(env, "EBB_BROKER_TIMEOUT", default.broker_timeout),
            reconnect_timeout=_seconds(env, "EBB_RECONNECT_TIMEOUT", default.reconnect_timeout),
            keep_results=_count(env, "EBB_KEEP_RESULTS", default.keep_results),
            keep_results_bytes=_count(env, "EBB_KEEP_RESULTS_BYTES", default.keep_results_bytes),
            max_attempts=_count(env, "EBB_MAX_ATTEMPTS", default.max_attempts),
            check_workflows=_flag(env, "EBB_CHECK_WORKFLOWS", default.check_workflows),
            max_params_bytes=_count(env, "EBB_MAX_PARAMS_BYTES", default.max_params_bytes),
            max_result_bytes=_count(env, "EBB_MAX_RESULT_BYTES", default.max_result_bytes),
            result_retry=_seconds(env, "EBB_RESULT_RETRY", default.result_retry),
            registry_grace=timedelta(
                seconds=_seconds(env, "EBB_REGISTRY_GRACE", default.registry_grace.total_seconds())
            ),
            audit_interval=_seconds(env, "EBB_AUDIT_INTERVAL", default.audit_interval),
            audit_delete_unexpiring=_flag(
                env, "EBB_AUDIT_DELETE_UNEXPIRING", default.audit_delete_unexpiring
            ),
            audit_streams=_count(env, "EBB_AUDIT_STREAMS", default.audit_streams),
            task_events=_flag(env, "EBB_TASK_EVENTS", default.task_events),
            tls_ca_file=_readable_file(env, "EBB_TLS_CA_FILE"),
            tls_cert_file=_readable_file(env, "EBB_TLS_CERT_FILE"),
            tls_key_file=_readable_file(env, "EBB_TLS_KEY_FILE"),
            metrics_port=_port(env, "EBB_METRICS_PORT"),
        )
        if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
            raise ConfigurationError(
                "EBB_TLS_CERT_FILE and EBB_TLS_KEY_FILE go together (a client certificate and its key): "
                "set both for mutual TLS, or neither"
            )
        if settings.audit_streams > MAX_AUDIT_STREAMS:
            raise ConfigurationError(
                f"EBB_AUDIT_STREAMS={settings.audit_streams} is more than {MAX_AUDIT_STREAMS}: the audit "
                "splits a node's job queues by their job id's first hex digit; set it to at most "
                f"{MAX_AUDIT_STREAMS} (about the RabbitMQ node's cores)"
            )
        if settings.default_ttl > settings.max_ttl:
            raise ConfigurationError(
                f"EBB_DEFAULT_TTL ({settings.default_ttl}) exceeds EBB_MAX_TTL ({settings.max_ttl}); "
                "lower the default or raise the maximum"
            )
        return settings
