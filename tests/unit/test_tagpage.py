"""Tag list pagination applied by stowage (``?n=&last=`` and the ``Link`` header)."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stowage.proxy.tagpage import TagPage, next_link, page_tag_body, page_tags

TAGS = ["v2", "latest", "v10", "1.0", "v1"]


@pytest.mark.parametrize(
    ("n", "last", "expected", "more"),
    [
        (None, None, ["1.0", "latest", "v1", "v10", "v2"], False),
        (None, "latest", ["v1", "v10", "v2"], False),
        (None, "lates", ["latest", "v1", "v10", "v2"], False),  # need not be a tag
        (None, "v2", [], False),
        ("2", None, ["1.0", "latest"], True),
        ("2", "latest", ["v1", "v10"], True),
        ("3", "latest", ["v1", "v10", "v2"], True),  # exactly n: a next page may exist
        ("4", "latest", ["v1", "v10", "v2"], False),
        ("0", None, [], False),
        ("-1", None, ["1.0", "latest", "v1", "v10", "v2"], False),  # malformed: no limit
        ("x", "v1", ["v10", "v2"], False),
        ("", "", ["1.0", "latest", "v1", "v10", "v2"], False),
    ],
)
def test_page_tags(n: str | None, last: str | None, expected: list[str], more: bool) -> None:
    assert page_tags(TAGS, n, last) == TagPage(expected, more)


def test_page_tag_body_keeps_other_fields_and_sorts() -> None:
    body = json.dumps({"name": "library/app", "tags": ["b", "a", "c"], "extra": 1}).encode()
    paged = page_tag_body(body, "2", None)
    assert paged is not None
    out, page = paged
    assert json.loads(out) == {"name": "library/app", "tags": ["a", "b"], "extra": 1}
    assert page == TagPage(["a", "b"], True)


@pytest.mark.parametrize(
    "body", [b"not json", b"[1, 2]", b'{"tags": "v1"}', b'{"tags": [1]}', b"\xff\xfe"]
)
def test_page_tag_body_leaves_other_documents_alone(body: bytes) -> None:
    assert page_tag_body(body, "1", "a") is None


def test_unpaged_requests_get_upstreams_body_as_is() -> None:
    assert page_tag_body(b'{"name": "x", "tags": ["b", "a"]}', None, None) is None


def test_null_tags_are_an_empty_list() -> None:
    paged = page_tag_body(b'{"name": "x", "tags": null}', "5", None)
    assert paged is not None
    assert json.loads(paged[0])["tags"] == []


def test_next_link_keeps_the_query_and_moves_last() -> None:
    page = TagPage(["a", "b"], True)
    link = next_link("/v2/library/app/tags/list", {"n": "2", "last": "0", "ns": "ghcr.io"}, page)
    assert link == '</v2/library/app/tags/list?n=2&ns=ghcr.io&last=b>; rel="next"'
    assert next_link("/v2/x/tags/list", {"n": "2"}, TagPage(["a"], False)) is None


@settings(max_examples=150, deadline=None)
@given(
    tags=st.lists(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}", fullmatch=True)),
    n=st.integers(min_value=1, max_value=7),
)
def test_following_links_lists_every_tag_once_in_order(tags: list[str], n: int) -> None:
    path, query = "/v2/org/app/tags/list", {"n": str(n)}
    seen: list[str] = []
    for _ in range(len(tags) + 2):
        page = page_tags(tags, query.get("n"), query.get("last"))
        assert len(page.tags) <= n
        seen += page.tags
        link = next_link(path, query, page)
        if link is None:
            break
        match = re.fullmatch(r'<([^>]*)>; rel="next"', link)
        assert match is not None
        url = urlsplit(match.group(1))
        assert url.path == path
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
    else:
        raise AssertionError("pagination did not end")
    assert seen == sorted(set(tags))
