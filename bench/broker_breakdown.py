"""Where a job's broker CPU goes: RabbitMQ reductions by process kind, and AMQP methods per job.

Issue 22 (a) asks why a three-queue Ebb job costs RabbitMQ more than the lean churn of the same
three queues. This runs both, one after the other against the broker of EBB_BROKER_URL, and
prints per job:

* the node's reductions (Erlang's unit of work) by process kind (queue process, channel, reader,
  writer, message store, Khepri/Ra, management collectors, ...), from a sampler process that
  ``rabbitmqctl eval`` starts on the node: it reads ``erlang:process_info(P, reductions)`` of
  every process every ``--interval`` ms, so a process that lives between two reads (a job's
  queue) is counted up to its last read; what no read saw (the tail of a process that ended, or
  one that lived less than an interval) is the row "ended between reads", from the node's total
  (``erlang:statistics(exact_reductions)``). The sampler's own work is left out;
* with ``--methods``, the AMQP methods each side sends per job (client and worker each reach the
  broker through a counting proxy in this process), publishes split by destination and
  persistence (delivery mode 2 or not);
* the CPU of each process group per job, from /proc (with a sampler running on the node, and
  proxies in this process with ``--methods``: compare rows of one run, not with ``bench_jobs.py``).

The lean churn runs sequentially, as ``bench_jobs.py`` runs it; Ebb's three-queue jobs run
``--jobs`` in flight (as in target (c)) and, with ``--seq``, also one at a time.

    .venv/bin/python bench/broker_breakdown.py [--jobs N] [--seq N] [--methods] [--top K]

``rabbitmqctl`` is ``EBB_TEST_RABBITMQCTL`` (a command line) and the node ``EBB_TEST_RABBITMQ_NODE``
when set (``--rabbitmqctl``, ``--node`` override them). Extra environment for the worker goes
with ``--worker-env NAME=VALUE``; the worker is ``bench.toggled_worker``, so
``--worker-env EBB_BENCH_TOGGLES=transient_result`` measures a step switched off.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import os
import re
import shlex
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as ``python bench/broker_breakdown.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_jobs
from bench.bench_jobs import METER, Stats, Tracker, say
from bench.cpu import TICKS
from bench.harness import INTERRUPTS, meter_for, remove_logs, worker
from ebb import JobClient, Settings, contract

# --- the sampler on the node ---------------------------------------------------------------------

#: A module compiled and loaded on the node by ``rabbitmqctl eval`` (interpreted, the sampler
#: would cost the node a core): ``start(IntervalMs)`` spawns the sampler, ``stop()`` prints one
#: line per process kind, "kind<TAB>reductions<TAB>processes", then "=total" and "=sampler".
SAMPLER_MODULE = r"""
-module(ebb_breakdown).
-export([start/1, stop/0]).

start(Interval) ->
    case whereis(ebb_breakdown) of undefined -> ok; Old -> exit(Old, kill) end,
    Pid = spawn(fun() -> init(Interval) end),
    register(ebb_breakdown, Pid),
    ok.

init(Interval) ->
    Me = self(),
    First = maps:fold(fun(P, {K, _, R}, Acc) -> Acc#{P => {K, R, R}} end, #{}, scan(#{}, Me)),
    erlang:system_flag(microstate_accounting, reset),
    erlang:system_flag(microstate_accounting, true),
    {T0, _} = erlang:statistics(exact_reductions),
    {reductions, M0} = erlang:process_info(Me, reductions),
    loop(Interval, First, T0, M0).

kind(P) ->
    case erlang:process_info(P, [registered_name, dictionary, initial_call]) of
        undefined -> gone;
        [{registered_name, N}, _, _] when N =/= [] -> N;
        [_, {dictionary, D}, {initial_call, IC}] ->
            case lists:keyfind(list_to_atom([36 | "initial_call"]), 1, D) of
                {_, {supervisor, M, _}} -> {sup, M};
                {_, {supervisor2, M, _}} -> {sup, M};
                {_, {M, _, _}} -> M;
                false -> element(1, IC)
            end
    end.

scan(Seen, Me) ->
    lists:foldl(
        fun(P, Acc) when P =:= Me -> Acc;
           (P, Acc) ->
                case erlang:process_info(P, reductions) of
                    undefined -> Acc;
                    {reductions, R} ->
                        case maps:find(P, Acc) of
                            {ok, {K, R0, _}} -> Acc#{P => {K, R0, R}};
                            error ->
                                case kind(P) of
                                    gone -> Acc;
                                    K -> Acc#{P => {K, 0, R}}
                                end
                        end
                end
        end, Seen, erlang:processes()).

loop(Interval, Seen, T0, M0) ->
    receive
        {stop, From} ->
            Final = scan(Seen, self()),
            {Total, _} = erlang:statistics(exact_reductions),
            {reductions, Mine} = erlang:process_info(self(), reductions),
            Msacc = erlang:statistics(microstate_accounting),
            erlang:system_flag(microstate_accounting, false),
            From ! {ebb_breakdown, Final, Total - T0, Mine - M0, Msacc}
    after Interval -> loop(Interval, scan(Seen, self()), T0, M0)
    end.

stop() ->
    Pid = whereis(ebb_breakdown),
    Pid ! {stop, self()},
    receive
        {ebb_breakdown, Final, Total, Mine, Msacc} ->
            States = lists:foldl(
                fun(#{type := T, counters := Cs}, Acc) ->
                    maps:fold(fun(St, V, A) ->
                        maps:update_with({T, St}, fun(X) -> X + V end, V, A) end, Acc, Cs)
                end, #{}, Msacc),
            [io:format("=msacc:~w:~w~c~b~c0~n", [T, St, 9,
                erlang:convert_time_unit(V, perf_counter, microsecond), 9])
             || {{T, St}, V} <- maps:to_list(States), V > 0],
            Sums = maps:fold(
                fun(_, {K, R0, R1}, Acc) ->
                    maps:update_with(K, fun({S, C}) -> {S + R1 - R0, C + 1} end, {R1 - R0, 1}, Acc)
                end, #{}, Final),
            [io:format("~w~c~b~c~b~n", [K, 9, S, 9, C]) || {K, {S, C}} <- maps:to_list(Sums)],
            io:format("=total~c~b~c0~n=sampler~c~b~c1~n", [9, Total, 9, 9, Mine, 9]),
            ok
    after 60000 -> timeout
    end.
"""

#: Compiles and loads ``SAMPLER_MODULE`` (sent base64: rabbitmqctl's wrapper passes its arguments
#: through a shell, which would expand a dollar sign).
LOAD = """
Src = binary_to_list(base64:decode(<<"%s">>)),
{ok, Tokens, _} = erl_scan:string(Src),
{Forms, []} = lists:foldl(fun({dot, _} = Dot, {Fs, Cur}) ->
        {ok, F} = erl_parse:parse_form(lists:reverse([Dot | Cur])), {[F | Fs], []};
    (T, {Fs, Cur}) -> {Fs, [T | Cur]} end, {[], []}, Tokens),
{ok, Mod, Bin} = compile:forms(lists:reverse(Forms), []),
{module, Mod} = code:load_binary(Mod, "ebb_breakdown.erl", Bin),
ok.
"""


@dataclasses.dataclass(frozen=True)
class Ctl:
    """``rabbitmqctl -n node eval`` for the measured node."""

    command: list[str]
    node: str

    def eval(self, expression: str) -> str:
        argv = [*self.command, "-n", self.node, "eval", expression]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl eval failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout


#: Process kinds grouped for the report: (pattern on the kind, group). First match wins.
GROUPS: list[tuple[str, str]] = [
    (r"^rabbit_amqqueue_process$|^rabbit_classic_queue|^rabbit_prequeue$", "queue processes"),
    (r"^rabbit_channel$", "channels"),
    (r"^rabbit_reader$|^rabbit_ssl|^ranch|^\{sup,rabbit_connection", "readers (connections)"),
    (r"^rabbit_writer$", "writers"),
    (r"^rabbit_limiter$", "limiters"),
    (r"^rabbit_heartbeat$", "heartbeats"),
    (r"^rabbit_msg_store|^msg_store", "message stores"),
    (r"^rabbit_khepri|^khepri|^ra_|^rabbitmq_metadata|^\{sup,ra_", "Khepri / Ra (metadata store)"),
    (r"metrics_collector$|metrics_gc$|^rabbit_mgmt|^rabbit_core_metrics", "management statistics"),
    (r"^rabbit_event$|^rabbit_event_|^gen_event$", "event manager and handlers"),
    (r"^delegate", "delegates"),
    (r"^rabbit_queue_index|^rabbit_classic_queue_index|^rabbit_variable_queue", "queue index"),
    (r"^\{sup,", "supervisors"),
    (r"^file_server|^erts_|^prim_file|^logger|^code_server", "files, logger, runtime"),
]


def group_of(kind: str) -> str:
    for pattern, group in GROUPS:
        if re.search(pattern, kind):
            return group
    return f"other: {kind}"


@dataclasses.dataclass
class Breakdown:
    """Reductions in a window by process kind (``'$total'``: the node's, all processes)."""

    kinds: dict[str, tuple[int, int]]

    @staticmethod
    def parse(text: str) -> Breakdown:
        kinds: dict[str, tuple[int, int]] = {}
        for line in text.splitlines():
            parts = line.split("\t")
            if len(parts) == 3 and parts[1].isdigit():
                kinds[parts[0].replace(" ", "")] = (int(parts[1]), int(parts[2]))
        if "=total" not in kinds:
            raise RuntimeError(f"the sampler answered nothing readable:\n{text}")
        return Breakdown(kinds)

    def per_group(self) -> dict[str, float]:
        """Reductions by group, with 'ended between reads' = total - seen - the sampler's own."""
        out: Counter[str] = Counter()
        seen = 0
        for kind, (reds, _) in self.kinds.items():
            if kind.startswith("="):
                continue
            out[group_of(kind)] += reds
            seen += reds
        total = self.kinds["=total"][0] - self.kinds["=sampler"][0]
        out["ended between reads"] = max(0, total - seen)
        out["total"] = total
        return dict(out)

    def msacc(self) -> dict[tuple[str, str], int]:
        """Microseconds of the node's threads in each state: (thread type, state) -> µs."""
        out: dict[tuple[str, str], int] = {}
        for key, (us, _) in self.kinds.items():
            if key.startswith("=msacc:"):
                _, thread, state = key.split(":")
                out[(thread, state)] = us
        return out

    def top_kinds(self, k: int) -> list[tuple[str, int]]:
        rows = [(kind, r) for kind, (r, _) in self.kinds.items() if not kind.startswith("=")]
        return sorted(rows, key=lambda row: -row[1])[:k]


class Sampler:
    def __init__(self, ctl: Ctl, interval_ms: int) -> None:
        self.ctl = ctl
        self.interval_ms = interval_ms

    def load(self) -> None:
        """Compile and load the sampler module on the node (once per run)."""
        source = base64.b64encode(SAMPLER_MODULE.encode()).decode()
        self.ctl.eval(LOAD % source)

    def start(self) -> None:
        self.ctl.eval(f"ebb_breakdown:start({self.interval_ms}).")

    def stop(self) -> Breakdown:
        return Breakdown.parse(self.ctl.eval("ebb_breakdown:stop()."))


# --- the AMQP method counter -----------------------------------------------------------------------

METHODS = {
    (10, 10): "connection.start",
    (10, 11): "connection.start-ok",
    (10, 30): "connection.tune",
    (10, 31): "connection.tune-ok",
    (10, 40): "connection.open",
    (10, 41): "connection.open-ok",
    (10, 50): "connection.close",
    (10, 51): "connection.close-ok",
    (10, 60): "connection.blocked",
    (10, 61): "connection.unblocked",
    (20, 10): "channel.open",
    (20, 11): "channel.open-ok",
    (20, 20): "channel.flow",
    (20, 21): "channel.flow-ok",
    (20, 40): "channel.close",
    (20, 41): "channel.close-ok",
    (40, 10): "exchange.declare",
    (40, 11): "exchange.declare-ok",
    (50, 10): "queue.declare",
    (50, 11): "queue.declare-ok",
    (50, 20): "queue.bind",
    (50, 21): "queue.bind-ok",
    (50, 40): "queue.delete",
    (50, 41): "queue.delete-ok",
    (60, 10): "basic.qos",
    (60, 11): "basic.qos-ok",
    (60, 20): "basic.consume",
    (60, 21): "basic.consume-ok",
    (60, 30): "basic.cancel",
    (60, 31): "basic.cancel-ok",
    (60, 40): "basic.publish",
    (60, 50): "basic.return",
    (60, 60): "basic.deliver",
    (60, 70): "basic.get",
    (60, 71): "basic.get-ok",
    (60, 72): "basic.get-empty",
    (60, 80): "basic.ack",
    (60, 90): "basic.reject",
    (60, 110): "basic.recover",
    (60, 120): "basic.nack",
    (85, 10): "confirm.select",
    (85, 11): "confirm.select-ok",
}


def _shortstr(buf: bytes, at: int) -> tuple[str, int]:
    n = buf[at]
    return buf[at + 1 : at + 1 + n].decode(errors="replace"), at + 1 + n


def destination(exchange: str, routing_key: str) -> str:
    """A publish's destination, by kind: a job queue's kind, the task queue, Celery's events."""
    if exchange:
        return f"exchange {exchange}"
    parsed = contract.parse_queue_name(routing_key)
    if parsed is not None:
        return f"jobs.*.{parsed[1].value}"
    return "task queue" if routing_key.startswith("bench.") else f"queue {routing_key.split('.')[0]}.*"


class FrameCounter:
    """Counts the methods in one direction of AMQP connections (frames parsed as they pass)."""

    def __init__(self, counts: Counter[str], lock: threading.Lock, side: str) -> None:
        self.counts, self.lock, self.side = counts, lock, side
        self.buf = b""
        self.header_done = side.endswith("<")  # the broker sends no protocol header
        self.pending: dict[int, str] = {}  # channel -> publish label waiting for its content header

    def feed(self, data: bytes) -> None:
        self.buf += data
        if not self.header_done:
            if len(self.buf) < 8:
                return
            self.buf, self.header_done = self.buf[8:], True
        while len(self.buf) >= 7:
            kind, channel, size = struct.unpack(">BHI", self.buf[:7])
            if len(self.buf) < size + 8:
                return
            payload, self.buf = self.buf[7 : 7 + size], self.buf[size + 8 :]
            if kind == 1:
                self._method(channel, payload)
            elif kind == 2 and channel in self.pending:
                self._content_header(channel, payload)

    def _count(self, name: str) -> None:
        with self.lock:
            self.counts[f"{self.side} {name}"] += 1

    def _method(self, channel: int, payload: bytes) -> None:
        class_id, method_id = struct.unpack(">HH", payload[:4])
        name = METHODS.get((class_id, method_id), f"{class_id}.{method_id}")
        if name == "basic.publish":
            exchange, at = _shortstr(payload, 6)
            routing_key, at = _shortstr(payload, at)
            self.pending[channel] = f"basic.publish to {destination(exchange, routing_key)}"
            return
        if name in ("queue.declare", "queue.delete"):
            queue, at = _shortstr(payload, 6)
            bits = payload[at] if name == "queue.declare" else 0
            parsed = contract.parse_queue_name(queue)
            target_ = f"jobs.*.{parsed[1].value}" if parsed else "other"
            passive = " passive" if name == "queue.declare" and bits & 1 else ""
            name = f"{name}{passive} ({target_})"
        self._count(name)

    def _content_header(self, channel: int, payload: bytes) -> None:
        label = self.pending.pop(channel)
        flags = struct.unpack(">H", payload[12:14])[0]
        at, mode = 14, 1
        if flags & 0x8000:  # content-type
            _, at = _shortstr(payload, at)
        if flags & 0x4000:  # content-encoding
            _, at = _shortstr(payload, at)
        if flags & 0x2000:  # headers
            at += 4 + struct.unpack(">I", payload[at : at + 4])[0]
        if flags & 0x1000:  # delivery-mode
            mode = payload[at]
        self._count(f"{label}, {'persistent' if mode == 2 else 'transient'}")


class CountingProxy:
    """A TCP proxy on 127.0.0.1 to the broker that counts each side's AMQP methods."""

    def __init__(self, host: str, port: int, side: str, counts: Counter[str], lock: threading.Lock) -> None:
        self.target, self.side, self.counts, self.lock = (host, port), side, counts, lock
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for src, dst, arrow in ((client, upstream, ">"), (upstream, client, "<")):
                counter = FrameCounter(self.counts, self.lock, f"{self.side} {arrow}")
                threading.Thread(target=self._pipe, args=(src, dst, counter), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, counter: FrameCounter) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                counter.feed(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def url(self, broker_url: str) -> str:
        parts = urlsplit(broker_url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


# --- the runs ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Window:
    """One measured window: jobs, reductions by group, methods, CPU per job from /proc."""

    label: str
    jobs: int
    breakdown: Breakdown
    methods: Counter[str]
    stats: Stats
    user_ms: float  # the broker's user and system CPU per job
    system_ms: float


def beam_times(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the broker's process (fields 14 and 15 of /proc/<pid>/stat)."""
    user = system = 0.0
    for pid in pids:
        text = Path(f"/proc/{pid}/stat").read_text()
        fields = text[text.rindex(")") + 2 :].split()
        user += int(fields[11]) / TICKS
        system += int(fields[12]) / TICKS
    return user, system


def measured(
    label: str,
    run: Callable[[], Stats],
    sampler: Sampler,
    counts: Counter[str],
    lock: threading.Lock,
) -> Window:
    with lock:
        before = Counter(counts)
    beam = METER.groups["rabbitmq"]()
    sampler.start()
    user0, system0 = beam_times(beam)
    stats = run()
    user1, system1 = beam_times(beam)
    breakdown = sampler.stop()
    with lock:
        methods = Counter(counts)
    methods.subtract(before)
    user, system = (user1 - user0) * 1000 / stats.jobs, (system1 - system0) * 1000 / stats.jobs
    return Window(label, stats.jobs, breakdown, +methods, stats, user, system)


def report(windows: list[Window], top: int) -> str:
    groups: list[str] = []
    per: list[dict[str, float]] = []
    for w in windows:
        g = {name: reds / w.jobs for name, reds in w.breakdown.per_group().items()}
        per.append(g)
        groups += [name for name in g if name not in groups]
    order = sorted((g for g in groups if g != "total"), key=lambda g: -max(p.get(g, 0) for p in per))
    width = 34
    head = "".join(f"{w.label[:20]:>22}" for w in windows)
    lines = ["RabbitMQ reductions per job, by process kind (thousands)", f"{'':<{width}}{head}"]
    small = 0.0
    for name in order:
        if max(p.get(name, 0) for p in per) < 200:
            small += 1
            continue
        cells = "".join(f"{p.get(name, 0) / 1000:>22.1f}" for p in per)
        lines.append(f"{name[: width - 1]:<{width}}{cells}")
    cells = "".join(f"{p['total'] / 1000:>22.1f}" for p in per)
    lines.append(f"{'total':<{width}}{cells}")
    lines.append(f"({small:.0f} kinds under 0.2 thousand per job left out)")
    lines += ["", "RabbitMQ threads, µs per job by state (microstate accounting, sleep left out)"]
    lines.append(f"{'':<{width}}{head}")
    accs = [w.breakdown.msacc() for w in windows]
    pairs = sorted({k for a in accs for k in a if k[1] != "sleep"})
    for pair in pairs:
        vals = [a.get(pair, 0) / w.jobs for a, w in zip(accs, windows, strict=True)]
        if max(vals) >= 50:
            label = f"{pair[0]}: {pair[1]}"
            lines.append(f"{label[: width - 1]:<{width}}" + "".join(f"{v:>22.0f}" for v in vals))
    vals = [
        sum(v for k, v in a.items() if k[1] != "sleep") / w.jobs for a, w in zip(accs, windows, strict=True)
    ]
    lines.append(f"{'all but sleep':<{width}}" + "".join(f"{v:>22.0f}" for v in vals))
    if len(windows) >= 2:
        base = per[0]
        lines += ["", f"difference per job, {windows[-1].label} - {windows[0].label} (thousands)"]
        diffs = sorted(
            ((per[-1].get(n, 0) - base.get(n, 0), n) for n in groups if n != "total"), reverse=True
        )
        lines += [f"  {n[:width]:<{width}}{d / 1000:>10.1f}" for d, n in diffs if abs(d) >= 500]
        total = per[-1]["total"] - base["total"]
        lines.append(f"  {'total':<{width}}{total / 1000:>10.1f}  ({per[-1]['total'] / base['total']:.2f}x)")
    lines += ["", "CPU ms per job from /proc (sampler on the node; proxies in this process with --methods)"]
    for w in windows:
        cpu = ", ".join(f"{g} {v:.2f}" for g, v in w.stats.cpu_ms.items())
        lines.append(f"  {w.label:<30} {cpu}; {w.stats.jobs_per_s:.1f} jobs/s")
        lines.append(f"  {'':<30} RabbitMQ user {w.user_ms:.2f}, system {w.system_ms:.2f}")
    for w in windows:
        lines += ["", f"top process kinds, {w.label} (thousand reductions per job)"]
        lines += [f"  {kind[:60]:<62}{r / w.jobs / 1000:>8.1f}" for kind, r in w.breakdown.top_kinds(top)]
    if any(w.methods for w in windows):
        names = sorted({n for w in windows for n in w.methods})
        lines += ["", "AMQP methods per job (> client or worker to broker, < broker to it)"]
        lines.append(f"{'':<70}" + "".join(f"{w.label[:20]:>22}" for w in windows))
        for name in names:
            cells = "".join(f"{w.methods.get(name, 0) / w.jobs:>22.2f}" for w in windows)
            lines.append(f"{name[:69]:<70}{cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=300, help="Ebb three-queue jobs in flight (300)")
    parser.add_argument("--seq", type=int, default=0, help="also this many Ebb jobs one at a time (0)")
    parser.add_argument("--churn", type=int, default=300, help="lean churn jobs, sequential (300)")
    parser.add_argument("--interval", type=int, default=20, help="sampler period, ms (20)")
    parser.add_argument("--methods", action="store_true", help="count AMQP methods through proxies")
    parser.add_argument("--top", type=int, default=12, help="process kinds listed per window (12)")
    parser.add_argument("--rabbitmqctl", default=os.environ.get("EBB_TEST_RABBITMQCTL", "rabbitmqctl"))
    parser.add_argument("--node", default=os.environ.get("EBB_TEST_RABBITMQ_NODE"))
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)

    base = Settings.from_env()
    broker = bench_jobs.measured_target(base)
    METER.groups = meter_for(broker)
    node = args.node or broker.node
    sampler = Sampler(Ctl(shlex.split(args.rabbitmqctl), node), args.interval)
    sampler.load()
    say(f"measuring {broker.describe()}; sampler on {node}")
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    client_settings, worker_url = base, base.broker_url
    if args.methods:
        parts = urlsplit(bench_jobs_first(base.broker_url))
        host, port = parts.hostname or "127.0.0.1", parts.port or 5672
        client_proxy = CountingProxy(host, port, "client", counts, lock)
        worker_proxy = CountingProxy(host, port, "worker", counts, lock)
        client_settings = dataclasses.replace(
            base, broker_url=client_proxy.url(bench_jobs_first(base.broker_url))
        )
        worker_url = worker_proxy.url(bench_jobs_first(base.broker_url))
    INTERRUPTS.install()
    run = uuid.uuid4().hex[:8]
    track = Tracker()
    logs = Path(tempfile.mkdtemp(prefix="ebb-breakdown-"))
    windows: list[Window] = []
    load = os.getloadavg()[0]
    try:
        bench_jobs.lean_churn(client_settings, track, 20, 0)  # warm up, outside the window
        windows.append(
            measured(
                "lean churn (seq)",
                lambda: bench_jobs.lean_churn(client_settings, track, args.churn, 0),
                sampler,
                counts,
                lock,
            )
        )
        settings = dataclasses.replace(client_settings, task_queue=f"bench.ebb.{run}")
        track.task_queues += [settings.task_queue, f"{settings.task_queue}.audit"]  # the worker declares both
        track.exchanges.append(settings.task_queue)
        env = {**os.environ, "EBB_TASK_QUEUE": settings.task_queue, "EBB_BROKER_URL": worker_url}
        env |= dict(item.split("=", 1) for item in args.worker_env)
        log = logs / "ebb-worker.log"
        with (
            worker("bench.toggled_worker", f"bench-breakdown-{run}@%h", env, log, say) as proc,
            JobClient(settings=settings) as client,
        ):
            bench_jobs.wait_ready(proc, log, bench_jobs.ebb_ready(client, track))
            bench_jobs.ebb(client, track, True, 0, 50, 4)  # warm up: the worker's pool, the client

            def flight() -> Stats:
                return bench_jobs.ebb(client, track, True, 0, args.jobs, 0)[1]

            windows.append(measured(f"Ebb 3q ({args.jobs} in flight)", flight, sampler, counts, lock))
            if args.seq:

                def seq() -> Stats:
                    stats = bench_jobs.ebb(client, track, True, args.seq, 1, 0)[0]
                    assert stats is not None
                    return stats

                windows.append(measured("Ebb 3q (seq)", seq, sampler, counts, lock))
    finally:
        bench_jobs.cleanup(base, track)
    print(
        f"RabbitMQ {broker.version}, node {node}; load average (1 min) before {load:.2f}, "
        f"after {os.getloadavg()[0]:.2f}; sampler every {args.interval} ms; worker env "
        f"{args.worker_env or 'default'}\n"
    )
    print(report(windows, args.top))
    remove_logs(logs)
    return 0


def bench_jobs_first(urls: str) -> str:
    """The first URL of a failover list."""
    return urls.split(";")[0].strip()


if __name__ == "__main__":
    sys.exit(main())
