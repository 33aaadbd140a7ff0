"""Unit tests for stowage.oci.digest."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stowage.oci.digest import Digest, InvalidDigest, UnsupportedDigest, is_digest

FAST = settings(max_examples=150, deadline=None)

EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
EMPTY_SHA512 = (
    "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
    "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
)
F64 = "f" * 64
F128 = "f" * 128


# --- parse: valid ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "algorithm", "hex_"),
    [
        (f"sha256:{EMPTY_SHA256}", "sha256", EMPTY_SHA256),
        (f"sha512:{EMPTY_SHA512}", "sha512", EMPTY_SHA512),
        (f"sha256:{F64}", "sha256", F64),
        (f"sha512:{F128}", "sha512", F128),
        ("sha256:" + "0123456789abcdef" * 4, "sha256", "0123456789abcdef" * 4),
    ],
)
def test_parse_valid(text: str, algorithm: str, hex_: str) -> None:
    d = Digest.parse(text)
    assert d.algorithm == algorithm
    assert d.hex == hex_
    assert str(d) == text
    assert d == Digest(algorithm, hex_)


# --- parse: invalid ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no algorithm prefix"),
        ("sha256", "no algorithm prefix"),
        (F64, "no algorithm prefix"),
        ("sha256:", "empty encoded part"),
        (f":{F64}", "empty algorithm"),
        ("sha256:xyz", "is not 64 lowercase hex characters"),
        ("sha256:" + "f" * 63, "is not 64 lowercase hex characters"),
        ("sha256:" + "f" * 65, "is not 64 lowercase hex characters"),
        ("sha256:" + "F" * 64, "is not 64 lowercase hex characters"),
        ("sha256:" + "g" * 64, "is not 64 lowercase hex characters"),
        # The encoded grammar admits '=', '_' and '-', but sha256 is hex only.
        ("sha256:" + "=" * 64, "is not 64 lowercase hex characters"),
        ("sha512:" + F64, "is not 128 lowercase hex characters"),
        ("sha256:ffffffffffffffffffffffffffffffffff", "is not 64 lowercase hex characters"),
        (f"SHA256:{F64}", "does not match the OCI digest grammar"),
        (f"sha256:{F64}:{F64}", "does not match the OCI digest grammar"),
        (f"sha256:{F64}\n", "does not match the OCI digest grammar"),
        (f" sha256:{F64}", "does not match the OCI digest grammar"),
        (f"sha256 :{F64}", "does not match the OCI digest grammar"),
        (f"sha-:{F64}", "does not match the OCI digest grammar"),
        (f"sha..256:{F64}", "does not match the OCI digest grammar"),
        ("sha256:ffff/ffff", "does not match the OCI digest grammar"),
    ],
)
def test_parse_invalid(text: str, message: str) -> None:
    with pytest.raises(InvalidDigest, match=message) as info:
        Digest.parse(text)
    assert not isinstance(info.value, UnsupportedDigest)


def test_invalid_digest_message_quotes_the_input() -> None:
    with pytest.raises(InvalidDigest) as info:
        Digest.parse("sha256:xyz")
    assert str(info.value) == "digest 'sha256:xyz' is not 64 lowercase hex characters"


@pytest.mark.parametrize(
    "text",
    [
        f"invaliddigest:{F64}",  # distribution/reference vector: ErrDigestUnsupported
        f"md5:{'f' * 32}",
        f"sha384:{'f' * 96}",
        "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",
        f"sha256+b64u:{F64}",
        "a.b_c-d+e:x=y_z-w",
    ],
)
def test_parse_unsupported(text: str) -> None:
    with pytest.raises(UnsupportedDigest, match="is not supported"):
        Digest.parse(text)
    # Still an InvalidDigest, so callers catching the base class reject it too.
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_error_message_is_bounded_for_huge_input() -> None:
    with pytest.raises(InvalidDigest) as info:
        Digest.parse("sha256:" + "z" * 100_000)
    assert len(str(info.value)) < 300
    assert "100007 characters" in str(info.value)


# --- constructor ----------------------------------------------------------------------


def test_constructor_validates() -> None:
    with pytest.raises(InvalidDigest, match="64 lowercase hex"):
        Digest("sha256", "abc")
    with pytest.raises(UnsupportedDigest):
        Digest("md5", "f" * 32)


def test_digest_is_frozen_and_hashable() -> None:
    d = Digest.parse(f"sha256:{F64}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.hex = EMPTY_SHA256  # type: ignore[misc]
    assert {d, Digest("sha256", F64)} == {d}
    assert d != Digest("sha256", EMPTY_SHA256)


# --- of / hasher ------------------------------------------------------------------------


def test_of_empty() -> None:
    assert str(Digest.of(b"")) == f"sha256:{EMPTY_SHA256}"
    assert str(Digest.of(b"", "sha512")) == f"sha512:{EMPTY_SHA512}"


def test_of_known_value() -> None:
    data = b"hello world"
    assert Digest.of(data).hex == hashlib.sha256(data).hexdigest()
    assert Digest.of(data, algorithm="sha512").hex == hashlib.sha512(data).hexdigest()


def test_of_unsupported_algorithm() -> None:
    with pytest.raises(UnsupportedDigest, match="'md5' is not supported"):
        Digest.of(b"x", "md5")


def test_hasher_is_fresh_each_time() -> None:
    d = Digest.of(b"abc")
    h1 = d.hasher()
    h1.update(b"abc")
    h2 = d.hasher()
    assert h2.hexdigest() == EMPTY_SHA256
    assert h1.hexdigest() == d.hex
    assert h1.name == "sha256"
    assert Digest.of(b"", "sha512").hasher().name == "sha512"


@FAST
@given(data=st.binary(max_size=512), split=st.integers(min_value=0, max_value=512))
def test_hasher_streaming_matches_of(data: bytes, split: int) -> None:
    for algorithm in ("sha256", "sha512"):
        d = Digest.of(data, algorithm)
        h = d.hasher()
        h.update(data[:split])
        h.update(data[split:])
        assert h.hexdigest() == d.hex


@FAST
@given(data=st.binary(max_size=256), algorithm=st.sampled_from(["sha256", "sha512"]))
def test_of_round_trips_through_parse(data: bytes, algorithm: str) -> None:
    d = Digest.of(data, algorithm)
    assert Digest.parse(str(d)) == d
    assert is_digest(str(d))


# --- is_digest ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"sha256:{F64}", True),
        ("sha256:abc", True),  # shape only: no length check
        (f"md5:{'f' * 32}", True),
        ("multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8", True),
        ("latest", False),
        ("v1.2.3", False),
        ("sha256", False),
        ("sha256:", False),
        (":abc", False),
        ("SHA256:abc", False),
        ("sha256:abc\n", False),
        ("", False),
    ],
)
def test_is_digest(text: str, expected: bool) -> None:
    assert is_digest(text) is expected


# --- properties over arbitrary text --------------------------------------------------------

digestish_text = st.one_of(
    st.text(max_size=80),
    st.lists(
        st.sampled_from(["sha256", "sha512", "md5", ":", "+", ".", "-", "_", "=", "f", "F", "0"]),
        max_size=12,
    ).map("".join),
    st.sampled_from(["sha256:", "sha512:"]).flatmap(
        lambda p: st.text("0123456789abcdefABCDEF=_-", min_size=60, max_size=130).map(
            lambda s: p + s
        )
    ),
)


@settings(max_examples=200, deadline=None)
@given(digestish_text)
def test_arbitrary_text_only_raises_invalid_digest(text: str) -> None:
    try:
        d = Digest.parse(text)
    except UnsupportedDigest:
        # Unsupported is reserved for grammatically valid digests.
        assert is_digest(text)
    except InvalidDigest:
        pass
    else:
        assert str(d) == text
        assert is_digest(text)
