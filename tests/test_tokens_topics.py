"""Tier 1: access tokens that name y-webrtc topics (signaling.tokens), and the mint CLI."""

import pytest

from signaling.tokens import TokenError, main, make_token, verify_token

pytestmark = pytest.mark.pure

SECRET = b"0123456789abcdef0123456789abcdef"
NOW = 1_757_422_800


def test_topics_and_prefix_round_trip():
    """A token's topics and topic prefix come back from verification as made."""
    claims = verify_token(SECRET, make_token(SECRET, 60, now=NOW, topics=["r1", "ü room"], topic_prefix="t/"),
                          NOW)
    assert (claims["topics"], claims["topic_prefix"]) == (["r1", "ü room"], "t/")
    assert "topics" not in verify_token(SECRET, make_token(SECRET, 60, now=NOW), NOW)


@pytest.mark.parametrize("kwargs", [{"topics": [""]}, {"topics": ["x" * 257]}, {"topics": ["a\nb"]},
                                    {"topics": ["r"] * 33}, {"topic_prefix": ""}, {"topic_prefix": "\x00"},
                                    {"topics": ["x" * 256] * 8}])
def test_bad_topics_are_not_minted(kwargs):
    """make_token refuses topics a server would refuse."""
    with pytest.raises(ValueError):
        make_token(SECRET, 60, now=NOW, **kwargs)


@pytest.mark.parametrize("claims", ['{"exp":%d,"topics":"r"}', '{"exp":%d,"topics":[1]}',
                                    '{"exp":%d,"topic_prefix":5}', '{"exp":%d,"topics":null,"topic_prefix":[]}'])
def test_signed_but_malformed_topics_are_refused(claims):
    """A validly signed token whose topic claims are malformed is refused (never a crash later)."""
    from signaling.tokens import _b64, _sign

    payload = _b64((claims % (NOW + 60)).encode())
    with pytest.raises(TokenError, match="invalid topics"):
        verify_token(SECRET, f"{payload}.{_sign(SECRET, payload)}", NOW)


def test_the_cli_mints_topic_tokens(tmp_path, capsys):
    """python -m signaling.tokens --topic ... --topic-prefix ... prints a token carrying them."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    assert main(["--secret-file", str(secret), "--topic", "r1", "--topic", "r2", "--topic-prefix", "team/"]) == 0
    token = capsys.readouterr().out.strip()
    import time

    claims = verify_token(SECRET, token, time.time())
    assert (claims["topics"], claims["topic_prefix"]) == (["r1", "r2"], "team/")
    assert main(["--secret-file", str(secret), "--topic", ""]) == 2
    assert "error" in capsys.readouterr().err
