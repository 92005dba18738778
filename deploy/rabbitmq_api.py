"""One RabbitMQ management API request for the deploy scripts, written as a curl config.

The scripts pipe what this prints into ``curl -K -``: the admin credentials, the URL and the JSON
body travel on curl's stdin, never on a command line (``ps`` shows every process's arguments to
every user). Passwords are read from the environment, bodies are built by ``json.dumps`` (so no
value can end its string and add fields), and every path segment is percent-encoded (the ``/``
vhost, ``ebb/test vhost``).

    python3 rabbitmq_api.py vhost
        the vhost to deploy into: RABBITMQ_VHOST (its name, not URL-encoded), / if unset
    python3 rabbitmq_api.py request METHOD SEGMENT... [--json OBJECT] [--set FIELD=VALUE]...
                                                      [--set-env FIELD=VARIABLE]...
        a request to RABBITMQ_URL/api/SEGMENT/... as RABBITMQ_ADMIN_USER/RABBITMQ_ADMIN_PASSWORD,
        with a JSON body: OBJECT (constant structure, numbers), FIELD set to VALUE (never a
        secret: it is on the command line), or to the value of the environment VARIABLE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any
from urllib.parse import quote

#: What curl's config parser unescapes inside a double-quoted value (everything else is literal).
CURL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


class Refusal(Exception):
    """A setting is missing or malformed: the script stops with this message."""


def curl_string(value: str) -> str:
    """``value`` as a double-quoted curl config string (curl's ``unslashquote`` reverses it)."""
    return '"' + "".join(CURL_ESCAPES.get(char, char) for char in value) + '"'


def env(name: str) -> str:
    value = os.environ.get(name)
    if value is None or value == "":
        raise Refusal(f"set {name}")
    return value


def vhost() -> str:
    """RABBITMQ_VHOST: a name as ``rabbitmqctl -p`` takes it (``/``, ``ebb/prod``), not encoded."""
    return os.environ.get("RABBITMQ_VHOST") or "/"


def pair(text: str) -> tuple[str, str]:
    field, sep, value = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE")
    return field, value


def body(template: str | None, fields: list[tuple[str, str]], secrets: list[tuple[str, str]]) -> str | None:
    if template is None and not fields and not secrets:
        return None
    try:
        document: Any = json.loads(template) if template is not None else {}
    except ValueError as exc:
        raise Refusal(f"--json {template!r} is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise Refusal(f"--json {template!r} is not a JSON object")
    document.update(fields)
    document.update((field, env(variable)) for field, variable in secrets)
    return json.dumps(document, separators=(",", ":"))


def request_config(args: argparse.Namespace) -> str:
    base = env("RABBITMQ_URL").rstrip("/")
    path = "/".join(quote(segment, safe="") for segment in args.segments)
    lines = [
        f"url = {curl_string(f'{base}/api/{path}')}",
        "globoff",  # a [ or { in the URL (an IPv6 host) is not a curl pattern
        f"user = {curl_string(env('RABBITMQ_ADMIN_USER') + ':' + env('RABBITMQ_ADMIN_PASSWORD'))}",
        f"request = {curl_string(args.method)}",
    ]
    ca_file = os.environ.get("EBB_TLS_CA_FILE")
    if ca_file:  # an https:// management API signed by a private CA
        lines.append(f"cacert = {curl_string(ca_file)}")
    data = body(args.json, args.set, args.set_env)
    if data is not None:  # JSON never starts with @, so curl never reads it as a file name
        lines += ['header = "content-type: application/json"', f"data-binary = {curl_string(data)}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="rabbitmq_api.py", description="A management API request as curl config"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("vhost")
    request = commands.add_parser("request")
    request.add_argument("method", choices=["GET", "PUT", "DELETE"])
    request.add_argument("segments", nargs="+")
    request.add_argument("--json")
    request.add_argument("--set", type=pair, action="append", default=[])
    request.add_argument("--set-env", type=pair, action="append", default=[])
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(vhost() if args.command == "vhost" else request_config(args))
    except Refusal as exc:
        print(f"{os.path.basename(sys.argv[0])}: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
