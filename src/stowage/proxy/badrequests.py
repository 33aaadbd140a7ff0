"""Requests refused by aiohttp's HTTP parser, logged as what they are.

aiohttp answers a request it cannot parse (no ``Host``, raw non-ASCII or control bytes in
the target, an oversized line or header, too many headers, an unknown method) with a plain
400 before any handler runs, and logs it as an ERROR with a traceback. Those are mistakes
(or probes) of the client, not of stowage: they become one structured ``info`` line, so a
client cannot fill the log with tracebacks and JSON logs stay JSON.
"""

from __future__ import annotations

import logging

import structlog
from aiohttp.http_exceptions import HttpProcessingError

from stowage.oci.digest import quote_bounded

__all__ = ["quiet_bad_requests"]

log = structlog.get_logger("stowage.server")


class _BadRequestFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
        log.info(
            "malformed HTTP request refused",
            remote=remote,
            status=exc.code,
            error=quote_bounded(" ".join(exc.message.split())),
        )
        return False


_FILTER = _BadRequestFilter()


def quiet_bad_requests() -> None:
    """Install the filter on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
