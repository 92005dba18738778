"""Reads queues through the RabbitMQ management HTTP API.

Never over AMQP: a passive declare or ``basic.get`` renews a queue's ``x-expires`` lease, which
would keep orphaned job queues alive for ever.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

import requests

from ebb import links
from ebb.config import Settings
from ebb.errors import UnavailableError
from ebb.redact import redact
from tasks.expiry_policy import Policy

#: What the audit reads of each queue. Per-queue statistics (``consumers``, ``idle_since``) make
#: RabbitMQ's answer ~6x slower at 30,000 queues, so the listing skips them (``disable_stats``,
#: with ``enable_queue_totals`` for message counts) and consumers come from ``/api/consumers``.
JOB_QUEUE_COLUMNS = ("name", "messages", "arguments", "state", "node")


class ManagementError(UnavailableError):
    """The management API could not be reached or refused the request."""


class StatsDisabled(ManagementError):
    """The node's management statistics are off ("Stats in management UI are disabled")."""


#: One line of ``/metrics/detailed?family=queue_consumer_count``.
PROMETHEUS_CONSUMERS = re.compile(
    r"^rabbitmq_detailed_queue_consumers"
    r'\{vhost="(?P<vhost>[^"]*)",queue="(?P<queue>[^"]*)"\} (?P<value>\S+)$',
    re.MULTILINE,
)


class BrokerAPI:
    def __init__(self, settings: Settings, *, timeout: float = 30.0) -> None:
        self.settings = settings
        self._session = requests.Session()
        self._session.auth = (settings.management_user, settings.management_password)
        # https:// URLs: the system's trust store or EBB_TLS_CA_FILE, a client certificate if set;
        # given on every request, where requests' REQUESTS_CA_BUNDLE cannot override them.
        self._tls = links.http_tls(settings)
        self._timeout = timeout
        self._vhost = quote(settings.vhost, safe="")
        #: EBB_MANAGEMENT_URL as a failover list (``;``-separated, as EBB_BROKER_URL): any live
        #: node of a cluster answers for all of them. The one that answered last is tried first.
        self.urls = [u.strip().rstrip("/") for u in settings.management_url.split(";") if u.strip()]
        self.prometheus_urls = [
            u.strip().rstrip("/") for u in settings.prometheus_url.split(";") if u.strip()
        ]
        #: Where the last listing's consumer counts came from: "management" or "prometheus".
        self.consumers_from = "management"

    def _request(self, method: str, path: str, params: dict[str, str] | None = None) -> requests.Response:
        """The first management URL that answers (a refused connection or a 5xx: the next one)."""
        failures: list[str] = []
        for url in list(self.urls):
            try:
                response = self._session.request(
                    method, f"{url}/api/{path}", params=params, timeout=self._timeout, **self._tls
                )
            except requests.RequestException as exc:
                failures.append(_failure(exc, url, "the RabbitMQ management API"))
                continue
            if response.status_code >= 500 and url != self.urls[-1]:
                failures.append(f"{url}: {response.status_code}")
                continue
            if url != self.urls[0]:
                self.urls.remove(url)
                self.urls.insert(0, url)
            return response
        raise ManagementError(
            f"cannot reach the RabbitMQ management API ({'; '.join(failures)}); enable it with "
            "'rabbitmq-plugins enable rabbitmq_management' or set EBB_MANAGEMENT_URL (a ';' list on "
            "a cluster)"
        )

    def _get(self, path: str, params: dict[str, str] | None = None) -> Any:
        response = self._request("GET", path, params)
        if response.status_code == 404:
            return None
        if response.status_code == 400 and "disabled" in response.text:
            raise StatsDisabled(response.text[:200])
        if response.status_code in (401, 403):
            raise ManagementError(
                f"the management API refused user {self.settings.management_user!r} "
                f"({response.status_code}); set EBB_MANAGEMENT_USER/EBB_MANAGEMENT_PASSWORD to a user "
                "with the monitoring tag"
            )
        if not response.ok:
            raise ManagementError(
                f"management API {response.url} answered {response.status_code}: {response.text[:200]}"
            )
        return response.json()

    def job_queues(self, columns: tuple[str, ...] = JOB_QUEUE_COLUMNS) -> list[dict[str, Any]]:
        """Every ``jobs.*`` queue of the vhost with ``columns`` and its ``consumers`` count.

        Two unpaginated requests: the queue listing without per-queue statistics, and the
        vhost's consumers (as many as there are connected callers' queues, not all queues).
        """
        data = self._get(
            f"queues/{self._vhost}",
            {"columns": ",".join(columns), "disable_stats": "true", "enable_queue_totals": "true"},
        )
        jobs = _job_entries(data)
        jobs += self._left_out_down(jobs, columns)
        counts = self._consumer_counts()
        for queue in jobs:
            # Unknown (a node whose metrics did not answer): None, and the audit judges later.
            queue["consumers"] = counts.get(queue["name"], None if self.consumers_from == "prometheus" else 0)
        return jobs

    def _left_out_down(self, listed: list[dict[str, Any]], columns: tuple[str, ...]) -> list[dict[str, Any]]:
        """The job queues of down nodes that the listing with queue totals left out.

        RabbitMQ 4 (Khepri) keeps a killed node's classic queues as live in its metadata, and
        its listing with ``enable_queue_totals`` then has them nowhere: totals come from the
        running nodes, and "down" there means stopped. The listing without totals still shows
        them, as ``state: down``: asked only while a node is down, for those the first left out.
        """
        down = {name for name, running in self.nodes() if not running}
        if not down:
            return []
        seen = {q["name"] for q in listed}
        return [
            q | {"state": "down"}
            for q in self._metadata_listing((*columns, "name", "node", "state"))
            if q["name"] not in seen and q.get("node") in down
        ]

    def still_declared(self, names: set[str]) -> set[str]:
        """Which of ``names`` the broker's metadata still holds, whatever their node's state.

        A node killed a moment ago has its queues drop out of the listing with totals before
        the cluster says it is down: those are out of reach, not gone. Touches no queue.
        """
        return names & {q["name"] for q in self._metadata_listing(("name",))}

    def _metadata_listing(self, columns: tuple[str, ...]) -> list[dict[str, Any]]:
        """The vhost's job queues as the metadata store has them (no totals, no statistics)."""
        wanted = dict.fromkeys((*columns, "name"))
        data = self._get(
            f"queues/{self._vhost}",
            {"columns": ",".join(c for c in wanted if c != "messages"), "disable_stats": "true"},
        )
        return _job_entries(data)

    def _consumer_counts(self) -> dict[str, int]:
        """Consumers per job queue: from the management statistics, or when they are off (a
        deprecated feature in RabbitMQ 4; ``/api/consumers`` then answers 400) from every
        node's rabbitmq_prometheus per-queue metrics. Neither touches a queue."""
        try:
            consumers = self._get(f"consumers/{self._vhost}", {"columns": "queue.name"})
        except StatsDisabled:
            self.consumers_from = "prometheus"
            return self._prometheus_consumer_counts()
        self.consumers_from = "management"
        if not isinstance(consumers, list):
            raise ManagementError(f"unexpected answer listing consumers: {str(consumers)[:200]}")
        counts: dict[str, int] = {}
        for consumer in consumers:
            name = str((consumer.get("queue") or {}).get("name", ""))
            if name.startswith("jobs."):
                counts[name] = counts.get(name, 0) + 1
        return counts

    def _prometheus_consumer_counts(self) -> dict[str, int]:
        """``rabbitmq_detailed_queue_consumers`` of the vhost from each node (each reports its own
        queues); a node that does not answer leaves its queues unknown, never zero."""
        counts: dict[str, int] = {}
        answered = []
        failures: list[str] = []
        for url in self.prometheus_urls:
            try:
                response = self._session.get(
                    f"{url}/metrics/detailed",
                    params={"family": "queue_consumer_count", "vhost": self.settings.vhost},
                    timeout=self._timeout,
                    **self._tls,
                )
                response.raise_for_status()
            except requests.RequestException as exc:
                failures.append(_failure(exc, url, "rabbitmq_prometheus"))
                continue
            answered.append(url)
            for match in PROMETHEUS_CONSUMERS.finditer(response.text):
                if match["vhost"] == self.settings.vhost and match["queue"].startswith("jobs."):
                    counts[match["queue"]] = int(float(match["value"]))
        if not answered:
            raise ManagementError(
                "the management statistics are off (deprecated in RabbitMQ 4) and rabbitmq_prometheus "
                f"answers at none of EBB_PROMETHEUS_URL ({'; '.join(failures)}): enable it "
                "with 'rabbitmq-plugins enable rabbitmq_prometheus' and list every node's URL"
            )
        return counts

    def policies(self) -> list[Policy]:
        """The vhost's policies and operator policies (the monitoring tag may read both)."""
        found: list[Policy] = []
        for path, operator in (("policies", False), ("operator-policies", True)):
            data = self._get(f"{path}/{self._vhost}")
            for raw in data if isinstance(data, list) else []:
                policy = Policy.from_api(raw, operator=operator) if isinstance(raw, dict) else None
                if policy is not None:
                    found.append(policy)
        return found

    def queue(self, name: str) -> dict[str, Any] | None:
        data = self._get(f"queues/{self._vhost}/{quote(name, safe='')}")
        return data if isinstance(data, dict) else None

    def down_home(self, name: str) -> str | None:
        """The node holding queue ``name`` if that node is not running, else ``None``.

        The node's own state says, not the queue's: RabbitMQ 4 reports a killed node's queue as
        ``running`` here (and 3.x answers 404 for it: unknown, ``None``).
        """
        data = self._get(f"queues/{self._vhost}/{quote(name, safe='')}", {"columns": "node"})
        node = str(data.get("node") or "") if isinstance(data, dict) else ""
        if not node:
            return None
        return node if dict(self.nodes()).get(node) is False else None

    def delete_queue(self, name: str, *, if_unused: bool = True) -> bool:
        """Delete through the API; ``if-unused`` makes the broker refuse if a consumer appeared."""
        params = {"if-unused": "true"} if if_unused else None
        response = self._request("DELETE", f"queues/{self._vhost}/{quote(name, safe='')}", params)
        return response.status_code in (200, 204)

    def nodes(self) -> list[tuple[str, bool]]:
        """Every node of the cluster and whether it runs (as the answering node sees it)."""
        data = self._get("nodes", {"columns": "name,running"})
        return [(str(n["name"]), bool(n.get("running"))) for n in data or [] if isinstance(n, dict)]


def _job_entries(data: Any) -> list[dict[str, Any]]:
    """The ``jobs.*`` queues of a queue listing."""
    if not isinstance(data, list):
        raise ManagementError(f"unexpected answer listing queues: {str(data)[:200]}")
    return [q for q in data if isinstance(q, dict) and str(q.get("name", "")).startswith("jobs.")]


def _failure(exc: requests.RequestException, url: str, what: str) -> str:
    """One URL's failure, in words: TLS problems say TLS and why; never a password."""
    return links.tls_problem(exc, url, what=what) or redact(f"{url}: {exc}")
