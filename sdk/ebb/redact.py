"""URLs without their passwords: every error and log line goes through ``redact`` first."""

from __future__ import annotations

import re

#: ``scheme://user:password@`` anywhere in a text; the password is what gets masked. A failover
#: list (``;``-separated) is several URLs, each masked.
_CREDENTIALS = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@;'\"]*):(?P<secret>[^\s;'\"]*)@")
MASK = "***"


def redact(text: str) -> str:
    """``text`` with the password of every URL in it masked."""
    if "://" not in text:
        return text
    return _CREDENTIALS.sub(lambda m: f"{m['head']}:{MASK}@", text)
