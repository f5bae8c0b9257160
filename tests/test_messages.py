"""Tier 1: parsing and encoding frames (signaling.messages), pure."""

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from signaling import messages
from signaling.registry import SignalingError

pytestmark = pytest.mark.pure


def refused(payload):
    with pytest.raises(SignalingError) as e:
        messages.parse(payload)
    return e.value.code, e.value.ref, e.value.message


def test_valid_message():
    """A well-formed message parses into type, to and data."""
    m = messages.parse(b'{"type":"offer","to":"x","data":{"sdp":"v=0"},"extra":1}')
    assert m == messages.Message("offer", "x", {"sdp": "v=0"})


def test_data_defaults_to_empty_object():
    """A message without data gets an empty object."""
    assert messages.parse(b'{"type":"ping","to":"x"}').data == {}


@pytest.mark.parametrize(
    "payload",
    [b"", b"nope", b'{"type":', b"[1,", b'{"type":"ping","to":NaN}', b"Infinity", b"[1e999]", b"[-1e400]"],
)
def test_invalid_json(payload):
    """Text that is not strict JSON is invalid-json with a null ref."""
    code, ref, text = refused(payload)
    assert (code, ref) == ("invalid-json", None)
    assert "JSON" in text


def test_deep_nesting_is_invalid_json():
    """JSON nested past the parser's limit is refused, not a crash."""
    code, ref, text = refused(b"[" * 100000 + b"]" * 100000)
    assert code == "invalid-json"
    assert "deeply" in text


@pytest.mark.parametrize(
    "payload, ref, needle",
    [
        (b"[]", None, "JSON object"),
        (b'"ping"', None, "JSON object"),
        (b"null", None, "JSON object"),
        (b'{"to":"x"}', None, '"type" is missing'),
        (b'{"type":5,"to":"x"}', None, '"type" must be a string'),
        (b'{"type":"ping"}', "ping", '"to" is missing'),
        (b'{"type":"ping","to":""}', "ping", '"to" must not be empty'),
        (b'{"type":"ping","to":7}', "ping", '"to" must be a string'),
        (b'{"type":"offer","to":"x","data":"sdp"}', "offer", '"data" must be a JSON object'),
        (b'{"type":"offer","to":"x","data":null}', "offer", '"data" must be a JSON object'),
        (b'{"type":"offer","to":"x","data":[1]}', "offer", "an array"),
    ],
)
def test_invalid_message(payload, ref, needle):
    """Wrong shapes are invalid-message, naming the field, with the type as ref when known."""
    code, got_ref, text = refused(payload)
    assert (code, got_ref) == ("invalid-message", ref)
    assert needle in text


@pytest.mark.parametrize("kind", ["welcome", "error", "PING", "hello", ""])
def test_unknown_type(kind):
    """Types outside the six client types are unknown-type with the type as ref."""
    code, ref, text = refused(json.dumps({"type": kind, "to": "x"}).encode())
    assert (code, ref) == ("unknown-type", kind)
    assert "ice-candidate" in text


def test_big_integers_relayed_exactly():
    """Integers beyond 64 bits come out of a relay as the same integers."""
    big = 123456789012345678901234567890
    sent = b'{"type":"offer","to":"x","data":{"n":123456789012345678901234567890,"m":-18446744073709551617}}'
    m = messages.parse(sent)
    assert m.data == {"n": big, "m": -18446744073709551617}
    assert b"123456789012345678901234567890" in messages.encode(messages.relay("offer", "me", m.data))


def test_encode_keeps_utf8():
    """Non-ASCII text is encoded as UTF-8, not as escapes."""
    out = messages.encode({"sdp": "a=ünï 漢字 🎉"})
    assert "a=ünï 漢字 🎉".encode() in out


def test_encode_lone_surrogate_falls_back_to_escapes():
    """A lone surrogate (only possible escaped) is relayed escaped, as the same value."""
    value = json.loads('"\\ud800x"')
    out = messages.encode({"v": value})
    assert json.loads(out) == {"v": value}
    out.decode("ascii")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text()
        | st.floats(allow_nan=False, allow_infinity=False),
        lambda children: st.lists(children, max_size=4)
        | st.dictionaries(st.text(), children, max_size=4),
        max_leaves=20,
    )
)
def test_relay_round_trips_any_data(value):
    """Any JSON value as data comes out of a relay frame equal to what went in."""
    sent = json.dumps({"type": "offer", "to": "x", "data": {"v": value}}).encode()
    m = messages.parse(sent)
    out = json.loads(messages.encode(messages.relay(m.type, "me", m.data)))
    assert out == {"type": "offer", "from": "me", "data": {"v": value}}


@given(st.binary(max_size=200))
def test_parse_never_raises_anything_else(payload):
    """Arbitrary bytes either parse or raise a SignalingError with a wire code."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return  # the WebSocket layer refuses invalid UTF-8 before us
    try:
        messages.parse(text.encode())
    except SignalingError as e:
        assert e.code in ("invalid-json", "invalid-message", "unknown-type")


@given(st.binary(max_size=120) | st.text(alphabet="0123456789 .-e,", max_size=80).map(str.encode))
def test_long_digit_run_check_matches_its_definition(payload):
    """The fast check finds a run of 20 ASCII digits exactly when a regular expression does."""
    assert messages._has_long_digit_run(payload) == (re.search(rb"[0-9]{20}", payload) is not None)


def test_long_digit_run_boundaries():
    assert messages._has_long_digit_run(b'{"n":18446744073709551616}')
    assert not messages._has_long_digit_run(b'{"n":1844674407370955161}')  # 19 digits: orjson keeps it
    assert not messages._has_long_digit_run(b'{"a":1234567890,"b":1234567890}')
