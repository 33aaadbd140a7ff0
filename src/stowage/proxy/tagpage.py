"""Tag list pagination (``?n=&last=``) as the distribution spec describes it.

The spec's tag list is a lexically sorted list: ``last`` starts the answer after that tag
and ``n`` limits it, with a ``Link: <...>; rel="next"`` header while more may follow.
Some upstreams ignore both parameters (CNCF Distribution 2.8 returns every tag, unsorted),
so stowage applies them itself to whatever upstream (or the cache) answered. For an
upstream that already paginated, doing it again changes nothing. A request without
either parameter gets upstream's list exactly as sent.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlencode

__all__ = ["TagPage", "next_link", "page_tag_body", "page_tags"]


@dataclass(frozen=True, slots=True)
class TagPage:
    tags: list[str]
    more: bool  # a next page may exist: the answer stopped at ``n``


def _limit(n: str | None) -> int | None:
    """``n`` as a limit; absent or malformed values mean no limit (as if not given)."""
    if n is None or not n.isascii() or not n.isdigit():
        return None
    return int(n)


def page_tags(tags: Sequence[str], n: str | None, last: str | None) -> TagPage:
    """The tags lexically after ``last`` (all when empty), at most ``n`` of them."""
    ordered = sorted(set(tags))
    if last:
        ordered = [t for t in ordered if t > last]
    limit = _limit(n)
    if limit is None or len(ordered) < limit:
        return TagPage(ordered, False)
    page = ordered[:limit]
    return TagPage(page, bool(page))


def page_tag_body(body: bytes, n: str | None, last: str | None) -> tuple[bytes, TagPage] | None:
    """Apply :func:`page_tags` to an upstream ``{"name", "tags"}`` document.

    None when the client asked for no page (neither ``n`` nor ``last``) or the body is not
    such a document: upstream's answer is then passed on as it was sent.
    """
    if n is None and last is None:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    tags = doc.get("tags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return None
    page = page_tags(tags, n, last)
    doc["tags"] = page.tags
    return json.dumps(doc).encode(), page


def next_link(path: str, query: Mapping[str, str], page: TagPage) -> str | None:
    """The ``Link`` header pointing at the page after ``page``, if one may exist.

    ``path`` is the request's path as sent; the query keeps every parameter the client
    gave (``ns`` among them) with ``last`` moved on.
    """
    if not page.more:
        return None
    params = {k: v for k, v in query.items() if k != "last"}
    params["last"] = page.tags[-1]
    return f'<{path}?{urlencode(params)}>; rel="next"'
