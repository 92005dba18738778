"""What does decoding a reply message cost the caller? Three decoders of the wire contract, in one run.

Every status, progress and result message a caller receives goes through ``contract.decode``
on its hot path (the consumer callback), so the issue asked us to "measure the decode cost of
each on the hot path and choose". This measures, per message and per decoder, the time of one
``decode(kind, body, content_type)`` call on realistic bodies made by ``encode_message``:

  before    the hand-written dataclasses (``json.loads`` + ``from_dict`` + ``_require`` checks),
            loaded at run time from git (commit 73b3a45, ``--before``) as ``ebb_contract_before``
  msgspec   ``ebb.contract.decode``: msgspec Structs, one ``msgspec.json.Decoder`` per kind
  pydantic  pydantic v2 models defined here with the same strictness, ``model_validate_json``
            behind the same content-type check and error mapping as the other two

Each figure is the best of 5 repeats of N decodes (N chosen so that a repeat takes about
0.2 s, garbage collection off as in ``timeit``), in µs per decode: wall time
(``perf_counter``) and CPU time (``process_time``). Before timing, every decoder must decode
every body to the values that were sent and must refuse the same malformed bodies (a progress
of 1.5 among them). Run from anywhere in a checkout (it reads the old module with ``git show``;
about 30 s)::

    .venv/bin/python bench/bench_contract.py [--json] [--before REV]

The table goes to stdout; with ``--json`` one JSON document goes to stdout and the table to
stderr.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import itertools
import json
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import msgspec
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ebb import contract
from ebb.contract import JobStatus, QueueKind
from ebb.errors import MalformedMessageError

ROOT = Path(__file__).resolve().parent.parent
BEFORE_REV = "73b3a45"
REPEATS = 5
CONTENT_TYPE = contract.CONTENT_TYPE
DECODERS = ("before", "msgspec", "pydantic")

Decode = Callable[[QueueKind, bytes, str | None], object]


# --- before: the hand-written decoder, from git --------------------------------------------


def load_before(rev: str) -> ModuleType:
    """Import ``sdk/ebb/contract.py`` as it was at ``rev``, under a private module name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:sdk/ebb/contract.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = "ebb_contract_before"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while building the class
        spec.loader.exec_module(module)
    return module


def before_decoder(old: ModuleType) -> Decode:
    kinds = {kind: old.QueueKind(kind.value) for kind in QueueKind}

    def decode(kind: QueueKind, body: bytes, content_type: str | None) -> object:
        return old.decode(kinds[kind], body, content_type)

    return decode


# --- pydantic: the same contract as the msgspec Structs --------------------------------------

Seq = Annotated[int, Field(ge=1)]
Attempt = Annotated[int, Field(ge=1)]
#: msgspec's ``Literal[1]``: pydantic's own ``Literal[1]`` takes a JSON ``true``, even when strict
#: (``True == 1``), and ``Strict()`` does not apply to literals; a strict int pinned to 1 does not.
Version = Annotated[int, Field(ge=1, le=1)]


class _Wire(BaseModel):
    # strict: no bool for int, no str for numbers (an int is still a float, as in msgspec);
    # unknown fields are ignored, as msgspec does by default.
    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


class PydanticStatus(_Wire):
    type: Literal["status"] = "status"
    job_id: uuid.UUID
    status: JobStatus
    seq: Seq
    at: float
    attempt: Attempt = 1
    v: Version = 1


class PydanticProgress(_Wire):
    type: Literal["progress"] = "progress"
    job_id: uuid.UUID
    progress: Annotated[float, Field(ge=0.0, le=1.0)]
    message: str
    seq: Seq
    at: float
    attempt: Attempt = 1
    v: Version = 1


class PydanticJobError(_Wire):
    type: str
    message: str
    traceback: str = ""
    logs: tuple[str, ...] = ()


class PydanticResult(_Wire):
    type: Literal["result"] = "result"
    job_id: uuid.UUID
    status: JobStatus
    output: Any = None
    error: PydanticJobError | None = None
    last_seq: dict[str, int] = Field(default_factory=dict)
    at: float
    attempt: Attempt = 1
    v: Version = 1

    @field_validator("status")
    @classmethod
    def _final(cls, status: JobStatus) -> JobStatus:
        if status not in contract.TERMINAL_STATUSES:
            raise ValueError(f"result status {status.value!r} is not a final status")
        return status


PYDANTIC_MODELS: dict[QueueKind, type[_Wire]] = {
    QueueKind.STATUS: PydanticStatus,
    QueueKind.PROGRESS: PydanticProgress,
    QueueKind.RESULT: PydanticResult,
}


def pydantic_decode(kind: QueueKind, body: bytes, content_type: str | None) -> object:
    """What ``contract.decode`` would be on pydantic: same content-type check, same error."""
    if content_type not in (None, CONTENT_TYPE):
        raise MalformedMessageError(f"content type {content_type!r} refused")
    try:
        return PYDANTIC_MODELS[kind].model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise MalformedMessageError(f"{kind.value} message refused: {exc}") from None


# --- bodies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    kind: QueueKind
    sent: contract.Message
    body: bytes


def cases() -> list[Case]:
    job_id = uuid.uuid4()
    at = time.time()
    large_output = {
        "rows": [
            {"id": i, "name": f"item-{i:04d}", "score": round(i / 7, 3), "ok": i % 3 != 0} for i in range(200)
        ]
    }
    messages: list[tuple[str, contract.Message]] = [
        ("status", contract.StatusUpdate(job_id, JobStatus.RUNNING, seq=1, at=at)),
        ("progress", contract.ProgressUpdate(job_id, 0.42, "resizing image 3/7", seq=4, at=at)),
        (
            "result (small)",
            contract.JobResult(
                job_id=job_id,
                status=JobStatus.SUCCEEDED,
                output={"url": "s3://bucket/out/3f2a.png", "width": 1024, "height": 768},
                last_seq={"status": 2, "progress": 7},
                at=at,
            ),
        ),
        (
            "result (large)",
            contract.JobResult(
                job_id=job_id,
                status=JobStatus.SUCCEEDED,
                output=large_output,
                last_seq={"status": 2, "progress": 200},
                at=at,
            ),
        ),
    ]
    kinds = {
        contract.StatusUpdate: QueueKind.STATUS,
        contract.ProgressUpdate: QueueKind.PROGRESS,
        contract.JobResult: QueueKind.RESULT,
    }
    return [Case(name, kinds[type(m)], m, contract.encode_message(m)) for name, m in messages]


def malformed(case: Case, **changes: object) -> bytes:
    data = json.loads(case.body)
    data.update(changes)
    return json.dumps(data).encode()


# --- checks ----------------------------------------------------------------------------------


def refuses(decode: Decode, kind: QueueKind, body: bytes) -> bool:
    try:
        decode(kind, body, CONTENT_TYPE)
    except MalformedMessageError:
        return True
    return False


def check(decoders: dict[str, Decode], all_cases: list[Case]) -> str:
    """Every decoder decodes every body to what was sent, and refuses the same bad bodies.

    Two bodies the old decoder let through (it never checked ``seq``'s range, and took a JSON
    ``true`` for version 1) must still be refused by msgspec and pydantic alike.
    """
    by_kind = {case.kind: case for case in all_cases}
    st, pr, re_ = by_kind[QueueKind.STATUS], by_kind[QueueKind.PROGRESS], by_kind[QueueKind.RESULT]
    refused_by_all = {
        "progress 1.5": (QueueKind.PROGRESS, malformed(pr, progress=1.5)),
        'progress "0.5"': (QueueKind.PROGRESS, malformed(pr, progress="0.5")),
        "seq true": (QueueKind.STATUS, malformed(st, seq=True)),
        "attempt 0": (QueueKind.STATUS, malformed(st, attempt=0)),
        "v 2": (QueueKind.STATUS, malformed(st, v=2)),
        "type progress": (QueueKind.STATUS, malformed(st, type="progress")),
        "result RUNNING": (QueueKind.RESULT, malformed(re_, status="RUNNING")),
    }
    refused_since = {
        "seq 0": (QueueKind.STATUS, malformed(st, seq=0)),
        "v true": (QueueKind.STATUS, malformed(st, v=True)),
    }
    extra_field = malformed(st, unknown={"x": 1})
    for label, decode in decoders.items():
        for case in all_cases:
            got = decode(case.kind, case.body, CONTENT_TYPE)
            for field in case.sent.__struct_fields__:
                if field == "v":
                    continue  # the old dataclasses have no version field (they check it)
                want, have = getattr(case.sent, field), getattr(got, field)
                assert have == want, f"{label} {case.name}: {field} = {have!r}, sent {want!r}"
        decode(QueueKind.STATUS, extra_field, CONTENT_TYPE)  # unknown fields are ignored
        for what, (kind, body) in refused_by_all.items():
            assert refuses(decode, kind, body), f"{label} accepted a message with {what}"
        for what, (kind, body) in refused_since.items():
            assert refuses(decode, kind, body) is (label != "before"), f"{label}: {what}"
    return (
        f"check: {len(decoders)} decoders x {len(all_cases)} messages decode to the sent values and "
        f"ignore unknown fields; all refuse {', '.join(refused_by_all)}; msgspec and pydantic also "
        f"refuse {', '.join(refused_since)} (before accepted them)"
    )


# --- timing ----------------------------------------------------------------------------------


def measure(call: Callable[[], object]) -> tuple[float, float]:
    """Best (wall, CPU) µs per call over REPEATS repeats of N calls, N for about 0.2 s each."""
    number, _ = timeit.Timer(call).autorange()
    walls, cpus = [], []
    for _ in range(REPEATS):
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            wall0, cpu0 = time.perf_counter(), time.process_time()
            for _ in itertools.repeat(None, number):
                call()
            cpu1, wall1 = time.process_time(), time.perf_counter()
        finally:
            if gc_was_enabled:
                gc.enable()
        walls.append(wall1 - wall0)
        cpus.append(cpu1 - cpu0)
    return round(min(walls) / number * 1e6, 3), round(min(cpus) / number * 1e6, 3)


@dataclass(frozen=True)
class Row:
    message: str
    body_bytes: int
    wall_us: dict[str, float]
    cpu_us: dict[str, float]

    @property
    def msgspec_vs_before(self) -> float:
        return self.wall_us["msgspec"] / self.wall_us["before"]

    @property
    def pydantic_vs_msgspec(self) -> float:
        return self.wall_us["pydantic"] / self.wall_us["msgspec"]


def run(decoders: dict[str, Decode], all_cases: list[Case]) -> list[Row]:
    rows = []
    for case in all_cases:
        wall, cpu = {}, {}
        for label, decode in decoders.items():
            print(f"timing {case.name} / {label}", file=sys.stderr)
            wall[label], cpu[label] = measure(functools.partial(decode, case.kind, case.body, CONTENT_TYPE))
        rows.append(Row(case.name, len(case.body), wall, cpu))
    return rows


def table(rows: list[Row], check_line: str, rev: str) -> str:
    def figures(us: dict[str, float]) -> str:
        return "".join(f"{us[label]:>13.2f}" for label in DECODERS)

    head = f"{'message':<16}{'bytes':>7}" + "".join(f"{label + ' µs':>13}" for label in DECODERS)
    lines = [
        f"decode, µs per message: best of {REPEATS} (before = {rev})",
        "",
        f"wall time (perf_counter)\n{head}{'msgspec/before':>16}{'pydantic/msgspec':>18}",
    ]
    for r in rows:
        lines.append(
            f"{r.message:<16}{r.body_bytes:>7}{figures(r.wall_us)}"
            f"{r.msgspec_vs_before:>16.2f}{r.pydantic_vs_msgspec:>18.2f}"
        )
    lines += ["", f"CPU time (process_time)\n{head}"]
    lines += [f"{r.message:<16}{r.body_bytes:>7}{figures(r.cpu_us)}" for r in rows]
    lines += ["", check_line]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--before", default=BEFORE_REV, help=f"git revision of the old decoder ({BEFORE_REV})"
    )
    args = parser.parse_args()

    decoders: dict[str, Decode] = {
        "before": before_decoder(load_before(args.before)),
        "msgspec": contract.decode,
        "pydantic": pydantic_decode,
    }
    all_cases = cases()
    check_line = check(decoders, all_cases)
    rows = run(decoders, all_cases)
    text = table(rows, check_line, args.before)
    if args.json:
        print(text, file=sys.stderr)
        document = {
            "before_rev": args.before,
            "repeats": REPEATS,
            "versions": {"msgspec": msgspec.__version__, "pydantic": pydantic.VERSION},
            "check": check_line,
            "rows": [
                {
                    **asdict(r),
                    "msgspec_vs_before": round(r.msgspec_vs_before, 3),
                    "pydantic_vs_msgspec": round(r.pydantic_vs_msgspec, 3),
                }
                for r in rows
            ],
        }
        print(json.dumps(document, indent=2))
    else:
        print(text)


if __name__ == "__main__":
    main()
