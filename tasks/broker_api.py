"""Reads queues through the RabbitMQ management HTTP API.

Never over AMQP: a passive declare or ``basic.get`` renews a queue's ``x-expires`` lease, which
would keep orphaned job queues alive for ever.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import ijson  # type: ignore[import-untyped]
import requests

from ebb import links
from ebb.config import Settings
from ebb.errors import UnavailableError
from ebb.redact import redact
from tasks.expiry_policy import Policy
from tasks.streams import in_batches

#: What the audit reads of each queue. Per-queue statistics (``consumers``, ``idle_since``) make
#: RabbitMQ's answer ~6x slower at 30,000 queues, so the listing skips them (``disable_stats``,
#: with ``enable_queue_totals`` for message counts) and consumers come from ``/api/consumers``.
JOB_QUEUE_COLUMNS = ("name", "messages", "arguments", "state", "node")


T = TypeVar("T")


class ManagementError(UnavailableError):
    """The management API could not be reached or refused the request."""


class StatsDisabled(ManagementError):
    """The node's management statistics are off ("Stats in management UI are disabled")."""


#: The per-queue lines the audit reads of ``/metrics/detailed`` (job queue names hold no
#: escaped quotes); matched over whole chunks, so the other lines are skipped at C speed.
PROMETHEUS_JOB_QUEUE_LINE = re.compile(
    rb'^rabbitmq_detailed_queue_(?P<metric>consumers|messages|info)\{vhost="(?P<vhost>[^"]*)",'
    rb'queue="(?P<queue>jobs\.[^"]*)"[^}]*\} (?P<value>\S+)$',
    re.MULTILINE,
)
#: RabbitMQ 4's plugin says which queues exist (``rabbitmq_detailed_queue_info``, from the
#: metadata store); a deleted queue's other rows linger for a while (seen for 3-14 s on 4.3.6).
#: The node a scrape came from: every answer of rabbitmq_prometheus names it.
PROMETHEUS_NODE = re.compile(rb'^rabbitmq_identity_info\{rabbitmq_node="(?P<node>[^"]*)"', re.MULTILINE)
#: Its version, from the same answer.
PROMETHEUS_VERSION = re.compile(
    rb'^rabbitmq_build_info\{[^}\n]*rabbitmq_version="(?P<version>[^"]*)"', re.MULTILINE
)
#: The first RabbitMQ whose rabbitmq_prometheus takes a ``queue`` filter (a regex on the name).
#: An older node ignores it and would answer every share with all its queues.
QUEUE_FILTER_SINCE = (4, 3)
#: What a job id may start with: a UUID's hex digits, which spread the ids evenly over them.
JOB_ID_FIRST = "0123456789abcdef"
#: Bytes read per chunk of a streamed answer: 300,000 queues are ~200 MB of text, never held whole.
STREAM_CHUNK = 1 << 20
#: Queues per hand-over from a node's stream when several nodes stream at once.
NODE_BATCH = 1000
#: Requests at once when asking queues to report their counts again (``wake_counts``).
WAKE_THREADS = 8


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
        #: Whether the last listing had each queue's ``arguments`` (``job_queues``).
        self.arguments_listed = True
        #: Whether the node's management statistics are off (then Prometheus it is): asked once.
        self._statistics_off: bool | None = None
        #: Whether its Prometheus says which queues exist (RabbitMQ 4: ``queue_info``).
        self._lists_queues = False
        #: Each Prometheus URL's shares of the job queues, read at once (``queue_filters``);
        #: a URL not in it is read whole. Filled by ``_prometheus_nodes``.
        self._shares: dict[str, list[str | None]] = {}

    def _request(
        self, method: str, path: str, params: dict[str, str] | None = None, *, stream: bool = False
    ) -> requests.Response:
        """The first management URL that answers (a refused connection or a 5xx: the next one)."""
        failures: list[str] = []
        for url in list(self.urls):
            try:
                response = self._session.request(
                    method,
                    f"{url}/api/{path}",
                    params=params,
                    timeout=self._timeout,
                    stream=stream,
                    **self._tls,
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

    def job_queues(
        self,
        columns: tuple[str, ...] = JOB_QUEUE_COLUMNS,
        *,
        arguments: bool = True,
        on_counted: Callable[[dict[str, Any]], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every ``jobs.*`` queue of the vhost with ``columns`` and its ``consumers`` count.

        With the management statistics on: two unpaginated requests, the queue listing without
        per-queue statistics, and the vhost's consumers (as many as there are connected callers'
        queues, not all queues). With them off (RabbitMQ 4's deprecation, and what scales):
        every node's Prometheus per-queue metrics, streamed. The management API's listing takes
        RabbitMQ ~40 µs per queue (12-15 s at 300,000) whatever the columns, so it is read only
        when needed: for queues' ``arguments`` (``arguments=False``: the caller can do without;
        ``self.arguments_listed`` says which it got), or when some node is down or its metrics
        did not answer, whose queues only the listing still shows.

        ``on_counted``: called with a queue's entry as soon as its count is read, where that is
        long before the entry is handed out (Prometheus lists which queues exist only after
        every count): the caller can start on it meanwhile. It may be a queue already gone; an
        entry handed out later is equal to it.
        """
        self.arguments_listed = True
        if self._statistics_off is None:
            overview = self._get("overview", {"columns": "disable_stats,rabbitmq_version"})
            overview = overview if isinstance(overview, dict) else {}
            self._statistics_off = overview.get("disable_stats") is True
            # RabbitMQ 4's Prometheus lists which queues exist (queue_info); 3.x's does not.
            self._lists_queues = _version(str(overview.get("rabbitmq_version", ""))) >= (4,)
        if not self._statistics_off:
            data = self._get(
                f"queues/{self._vhost}",
                {"columns": ",".join(columns), "disable_stats": "true", "enable_queue_totals": "true"},
            )
            jobs = _job_entries(data)
            jobs += self._left_out_down(jobs, columns)
            try:
                counts = self._consumer_counts()
            except StatsDisabled:
                self._statistics_off = True
            else:
                for queue in jobs:
                    queue["consumers"] = counts.get(queue["name"], 0)
                return _drain(jobs)
        self.consumers_from = "prometheus"
        if not arguments and self._lists_queues:
            nodes = self.nodes()
            answering = self._prometheus_nodes()
            if all(running for _, running in nodes) and set(answering.values()) >= {n for n, _ in nodes}:
                self.arguments_listed = False
                return self._job_queues_from_prometheus(answering, on_counted)
        return self._job_queues_without_statistics(columns)

    def _job_queues_from_prometheus(
        self, answering: dict[str, str], on_counted: Callable[[dict[str, Any]], None] | None
    ) -> Iterator[dict[str, Any]]:
        """Every node answers for its own queues: they are all there is. Handed out as each
        node's metrics stream in, so the caller's work overlaps RabbitMQ's; no arguments, no
        message counts (``messages()`` has those). A queue listed without a consumer count:
        ``None``, judged next time."""
        one_url_each = {node: url for url, node in answering.items()}  # a node listed twice: once
        sources = [
            partial(self._node_job_queues, url, node, on_counted) for node, url in one_url_each.items()
        ]
        if len(sources) == 1:
            yield from sources[0]()
            return
        # Each node renders its own queues at once: the audit takes the slowest node's time, not
        # the sum of all nodes'.
        for batch in in_batches(sources, NODE_BATCH, name="ebb-audit-node"):
            yield from batch

    def _node_job_queues(
        self, url: str, node: str, on_counted: Callable[[dict[str, Any]], None] | None
    ) -> Iterator[dict[str, Any]]:
        def entry(name: str, count: int | None) -> dict[str, Any]:
            return {"name": name, "node": node, "state": "running", "consumers": count, "messages": None}

        counted = None if on_counted is None else lambda name, count: on_counted(entry(name, count))

        def share(queue_filter: str | None) -> Iterator[dict[str, Any]]:
            counts = self._prometheus_stream(
                url,
                "queue_consumer_count",
                b"consumers",
                present_only=True,
                on_counted=counted,
                queue_filter=queue_filter,
            )
            return (entry(name, count) for name, count in counts)

        return self._in_shares(url, share)

    def _in_shares(self, url: str, read: Callable[..., Iterable[T]]) -> Iterator[T]:
        """``read(queue_filter=…)`` of each share of the node's job queues, all at once (one
        Erlang process renders each answer: 300,000 queues took one 4.3 node 11.5-19 s in one
        answer, 5.5-8.4 s in two at once on 2 cores), or once for all where it cannot filter."""
        shares = self._shares.get(url, [None])
        if len(shares) == 1:
            yield from read(queue_filter=shares[0])
            return
        for batch in in_batches(
            [partial(read, queue_filter=f) for f in shares], NODE_BATCH, name="ebb-audit-share"
        ):
            yield from batch

    def messages(self) -> dict[str, int]:
        """Messages waiting in each job queue of the vhost, where not zero (Prometheus)."""
        return self._prometheus_per_queue("queue_coarse_metrics", b"messages")

    def _prometheus_nodes(self) -> dict[str, str]:
        """EBB_PROMETHEUS_URL -> the node answering there (its ``rabbitmq_identity_info``), for
        those that answer. Asked for a family nobody has, the answer is those few lines (a real
        family, even of an empty vhost, makes the node walk every queue's row)."""
        found: dict[str, str] = {}
        for url in self.prometheus_urls:
            try:
                response = self._session.get(
                    f"{url}/metrics/detailed",
                    params={"family": "identity_info"},
                    timeout=self._timeout,
                    **self._tls,
                )
                response.raise_for_status()
            except requests.RequestException:
                continue
            match = PROMETHEUS_NODE.search(response.content)
            if match is not None:
                found[url] = match["node"].decode()
                self._shares[url] = shares_of(response.content, self.settings.audit_streams)
        return found

    def _job_queues_without_statistics(self, columns: tuple[str, ...]) -> Iterator[dict[str, Any]]:
        """The metadata listing (queues of a down node are there, ``state: down``) with consumers
        from Prometheus, read while the listing streams in (kept as compact tuples meanwhile).
        A queue its node's metrics did not report has ``None`` for both counts: judged next time.
        """
        wanted = [c for c in dict.fromkeys((*columns, "name")) if c != "messages"]
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ebb-audit-prometheus") as pool:
            usage = pool.submit(self._prometheus_per_queue, "queue_consumer_count", b"consumers")
            shared: dict[Any, Any] = {}
            listed = [tuple(_compact(q.get(c), shared) for c in wanted) for q in self._stream_listing(wanted)]
            consumers = usage.result()
        listed.reverse()
        while listed:  # freed as they are handed out: the caller keeps what it makes of them
            queue = dict(zip(wanted, listed.pop(), strict=True))
            queue["consumers"] = consumers.get(queue["name"])
            queue["messages"] = None  # what an unused queue holds: ``messages()``, if needed
            yield queue

    def _stream_listing(self, columns: list[str]) -> Iterator[dict[str, Any]]:
        """The vhost's job queues without statistics, parsed as they arrive (ijson)."""
        response = self._request(
            "GET",
            f"queues/{self._vhost}",
            {"columns": ",".join(columns), "disable_stats": "true"},
            stream=True,
        )
        with response:
            if not response.ok:
                raise ManagementError(
                    f"management API {response.url} answered {response.status_code}: {response.text[:200]}"
                )
            response.raw.decode_content = True
            for queue in ijson.items(response.raw, "item", use_float=True):
                if isinstance(queue, dict) and str(queue.get("name", "")).startswith("jobs."):
                    yield queue

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
        """Consumers per job queue from the management statistics; ``StatsDisabled`` when they
        are off (a deprecated feature in RabbitMQ 4: ``/api/consumers`` then answers 400)."""
        consumers = self._get(f"consumers/{self._vhost}", {"columns": "queue.name"})
        self.consumers_from = "management"
        if not isinstance(consumers, list):
            raise ManagementError(f"unexpected answer listing consumers: {str(consumers)[:200]}")
        counts: dict[str, int] = {}
        for consumer in consumers:
            name = str((consumer.get("queue") or {}).get("name", ""))
            if name.startswith("jobs."):
                counts[name] = counts.get(name, 0) + 1
        return counts

    def _prometheus_per_queue(self, family: str, metric: bytes) -> dict[str, int]:
        """One per-queue metric of the vhost's job queues (``consumers``, or ``messages`` where not
        zero) from each node's rabbitmq_prometheus (each reports its own queues). A node that
        does not answer leaves its queues out: unknown, never unused."""
        if not self._shares:
            self._prometheus_nodes()  # which nodes can answer in shares
        values: dict[str, int] = {}
        answered = False
        failures: list[str] = []
        for url in self.prometheus_urls:
            read = partial(self._prometheus_stream, url, family, metric)
            try:
                values.update((name, v) for name, v in self._in_shares(url, read) if v is not None)
            except requests.RequestException as exc:
                failures.append(_failure(exc, url, "rabbitmq_prometheus"))
                continue
            answered = True
        if not answered:
            raise ManagementError(
                "the management statistics are off (deprecated in RabbitMQ 4) and rabbitmq_prometheus "
                f"answers at none of EBB_PROMETHEUS_URL ({'; '.join(failures)}): enable it "
                "with 'rabbitmq-plugins enable rabbitmq_prometheus' and list every node's URL"
            )
        return values

    def _prometheus_stream(
        self,
        url: str,
        family: str,
        metric: bytes,
        *,
        present_only: bool = False,
        on_counted: Callable[[str, int], None] | None = None,
        queue_filter: str | None = None,
    ) -> Iterator[tuple[str, int | None]]:
        """(queue, value) of one node's per-queue metric, as the lines arrive (``messages``: only
        where not zero). ``present_only``: only queues the node's metadata still has (their
        ``queue_info`` line), with ``None`` for one whose value is missing; the rows of a deleted
        queue linger. ``queue_filter``: only the queues whose names it matches (RabbitMQ 4.3+).
        Uncompressed: gzip of ~250 bytes a queue costs the node more than it saves."""
        params = {"family": family, "vhost": self.settings.vhost}
        if queue_filter is not None:
            params["queue"] = queue_filter
        with self._session.get(
            f"{url}/metrics/detailed",
            params=params,
            headers={"Accept-Encoding": "identity"},
            timeout=self._timeout,
            stream=True,
            **self._tls,
        ) as response:
            response.raise_for_status()
            response.raw.decode_content = True
            lines = _matches(response.raw, PROMETHEUS_JOB_QUEUE_LINE)
            yield from per_queue(
                lines, self.settings.vhost, metric, present_only=present_only, on_counted=on_counted
            )

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

    def wake_counts(self, names: list[str]) -> int:
        """Ask each queue's process for its message totals, so that it reports its counts again.

        RabbitMQ's metrics housekeeping (``rabbit_core_metrics_gc``, every 2 minutes) can drop
        the row of a queue declared while it ran, and an idle queue does not report again until
        something happens to it: its consumer count is then missing from Prometheus for as long
        as it waits. The management API's ``enable_queue_totals`` asks the queue's process, which
        then reports within one statistics interval. This renews no lease: only a declare, a
        ``basic.get`` or a consumer does. Returns how many were asked (a gone queue: not).
        RabbitMQ 3 answers totals from its metrics tables without asking the queue: none there.
        """
        if not self._lists_queues:
            return 0

        def ask(name: str) -> bool:
            response = self._request(
                "GET",
                f"queues/{self._vhost}/{quote(name, safe='')}",
                {"enable_queue_totals": "true", "columns": "name,messages"},
            )
            return response.status_code == 200

        with ThreadPoolExecutor(max_workers=WAKE_THREADS, thread_name_prefix="ebb-audit-wake") as pool:
            return sum(pool.map(ask, names))

    def delete_queue(self, name: str, *, if_unused: bool = True) -> bool:
        """Delete through the API; ``if-unused`` makes the broker refuse if a consumer appeared."""
        params = {"if-unused": "true"} if if_unused else None
        response = self._request("DELETE", f"queues/{self._vhost}/{quote(name, safe='')}", params)
        return response.status_code in (200, 204)

    def nodes(self) -> list[tuple[str, bool]]:
        """Every node of the cluster and whether it runs (as the answering node sees it)."""
        data = self._get("nodes", {"columns": "name,running"})
        return [(str(n["name"]), bool(n.get("running"))) for n in data or [] if isinstance(n, dict)]


def per_queue(
    lines: Iterator[re.Match[bytes]],
    vhost: str,
    metric: bytes,
    *,
    present_only: bool = False,
    on_counted: Callable[[str, int], None] | None = None,
) -> Iterator[tuple[str, int | None]]:
    """(queue, value) of ``metric`` in the vhost's per-queue lines, as they come (``messages``:
    only where not zero). ``present_only``: only queues that have a ``queue_info`` line (the
    node's metadata still has them), ``None`` for one whose value is missing, whichever of
    the two lines comes first."""
    wanted = vhost.encode()
    values: dict[str, int] = {}
    present: set[str] = set()
    for match in lines:
        if match["vhost"] != wanted:
            continue
        name = sys.intern(match["queue"].decode())
        if match["metric"] == b"info":
            if not present_only:
                continue
            if name in values:  # both lines seen: hand it out, keep nothing
                yield name, values.pop(name)
            else:
                present.add(name)
        elif match["metric"] == metric:
            value = int(float(match["value"]))
            if not present_only:
                if value or metric == b"consumers":
                    yield name, value
            elif name in present:
                present.discard(name)
                yield name, value
            else:
                values[name] = value
                if on_counted is not None:
                    on_counted(name, value)
    for name in present:  # listed, but no value came for it
        yield name, None


def _matches(stream: Any, pattern: re.Pattern[bytes]) -> Iterator[re.Match[bytes]]:
    """``pattern``'s matches in a streamed text, read a chunk at a time, whole lines only."""
    rest = b""
    while chunk := stream.read(STREAM_CHUNK):
        text = rest + chunk
        end = text.rfind(b"\n") + 1
        yield from pattern.finditer(text, 0, end)
        rest = text[end:]
    yield from pattern.finditer(rest)


def shares_of(answer: bytes, streams: int) -> list[str | None]:
    """The ``queue`` filters to read a node in ``streams`` shares, from any answer of its
    ``/metrics/detailed`` (its version): ``[None]``, read whole, where it cannot filter."""
    version = PROMETHEUS_VERSION.search(answer)
    if version is None or _version(version["version"].decode()) < QUEUE_FILTER_SINCE:
        return [None]
    return queue_filters(streams)


def queue_filters(shares: int) -> list[str | None]:
    """Regexes for rabbitmq_prometheus's ``queue`` filter that split the job queues into
    ``shares`` by the first character of their job id: a job's three queues fall in one share,
    and every name in exactly one (the last takes whatever the others do not). ``[None]``: one."""
    shares = max(1, min(shares, len(JOB_ID_FIRST)))  # Settings allows at most MAX_AUDIT_STREAMS
    if shares == 1:
        return [None]
    groups = [
        JOB_ID_FIRST[i * len(JOB_ID_FIRST) // shares : (i + 1) * len(JOB_ID_FIRST) // shares]
        for i in range(shares)
    ]
    taken = "".join(groups[:-1])
    return [*(rf"^jobs\.[{group}]" for group in groups[:-1]), rf"^jobs\.(?![{taken}])"]


def _version(version: str) -> tuple[int, ...]:
    """(4, 3) of "4.3.6"; () when it cannot be read."""
    parts = version.split(".")[:2]
    return tuple(int(p) for p in parts) if all(p.isdigit() for p in parts) else ()


def _drain(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The items in order, each let go once handed out."""
    items.reverse()
    while items:
        yield items.pop()


def _compact(value: Any, shared: dict[Any, Any]) -> Any:
    """One object for equal values (node names, states, the arguments every job queue shares):
    300,000 queues' listing would otherwise hold 300,000 copies of each."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, dict):
        try:
            key = tuple(sorted(value.items()))
            return shared.setdefault(key, value)
        except TypeError:  # an unhashable argument value: keep this one as it is
            return value
    return value


def _job_entries(data: Any) -> list[dict[str, Any]]:
    """The ``jobs.*`` queues of a queue listing."""
    if not isinstance(data, list):
        raise ManagementError(f"unexpected answer listing queues: {str(data)[:200]}")
    return [q for q in data if isinstance(q, dict) and str(q.get("name", "")).startswith("jobs.")]


def _failure(exc: requests.RequestException, url: str, what: str) -> str:
    """One URL's failure, in words: TLS problems say TLS and why; never a password."""
    return links.tls_problem(exc, url, what=what) or redact(f"{url}: {exc}")
