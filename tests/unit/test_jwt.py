"""Token verification against real keys and hand-built hostile tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.auth.jwt import (
    ALGORITHMS,
    Credentials,
    TokenError,
    TokenVerifier,
    generate_signing_key,
    mint_token,
)
from shim.core.config import ConfigError, Settings

USER = "user-3f9a1c2e"


@pytest.fixture(scope="module")
def keys() -> dict[str, tuple[str, str]]:
    return {algorithm: generate_signing_key(algorithm) for algorithm in ALGORITHMS}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def hand_built(header: dict[str, Any], claims: dict[str, Any], sign: Any = None) -> str:
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(claims))}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64url(signature)}"


def refused(verifier: TokenVerifier, token: str) -> TokenError:
    with pytest.raises(TokenError) as info:
        verifier.verify_connection(token)
    assert token not in str(info.value)
    return info.value


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_minted_token_verifies_with_each_algorithm(
    keys: dict[str, tuple[str, str]], algorithm: str
) -> None:
    private, public = keys[algorithm]
    token = mint_token(private, algorithm, user=USER, ttl_seconds=600, extra={"role": "admin"})
    credentials = TokenVerifier(algorithm, public).verify_connection(token)
    assert credentials.user == USER
    assert abs(credentials.expires_at - (time.time() + 600)) < 5
    # Only the claims no field carries stay, for custom policies.
    assert dict(credentials.claims) == {"role": "admin"}


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256", "ES256"])
def test_verifier_accepts_private_key_pem(keys: dict[str, tuple[str, str]], algorithm: str) -> None:
    private, _ = keys[algorithm]
    token = mint_token(private, algorithm, user=USER)
    assert TokenVerifier(algorithm, private.encode()).verify_connection(token).user == USER


def test_minted_token_has_the_products_shape(keys: dict[str, tuple[str, str]]) -> None:
    token = mint_token(keys["EdDSA"][0], "EdDSA", user=USER)
    header, payload, _ = token.split(".")
    assert segment(header) == b'{"alg":"EdDSA","typ":"JWT"}'
    claims = orjson.loads(segment(payload))
    assert list(claims) == ["user_id", "iss", "sub", "exp", "iat"]
    assert claims["user_id"] == claims["sub"] == USER
    assert claims["exp"] - claims["iat"] == 3600


def test_token_without_exp_never_expires(keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys["EdDSA"]
    token = mint_token(private, "EdDSA", user=USER, ttl_seconds=None)
    assert "exp" not in orjson.loads(segment(token.split(".")[1]))
    assert TokenVerifier("EdDSA", public).verify_connection(token).expires_at == 0


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_expired_token_is_marked_expired(keys: dict[str, tuple[str, str]], algorithm: str) -> None:
    private, public = keys[algorithm]
    token = mint_token(private, algorithm, user=USER, ttl_seconds=-1)
    error = refused(TokenVerifier(algorithm, public), token)
    assert error.expired is True


def test_leeway_accepts_a_just_expired_token(keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys["EdDSA"]
    token = mint_token(private, "EdDSA", user=USER, ttl_seconds=-5)
    assert TokenVerifier("EdDSA", public, leeway=60).verify_connection(token).user == USER
    assert refused(TokenVerifier("EdDSA", public), token).expired


def test_expired_token_with_bad_signature_is_not_expired(
    keys: dict[str, tuple[str, str]],
) -> None:
    private, public = keys["EdDSA"]
    header, payload, signature = mint_token(private, "EdDSA", user=USER, ttl_seconds=-60).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    error = refused(TokenVerifier("EdDSA", public), f"{header}.{payload}.{flipped}")
    assert error.expired is False


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_tampered_signature_is_refused(keys: dict[str, tuple[str, str]], algorithm: str) -> None:
    private, public = keys[algorithm]
    header, payload, signature = mint_token(private, algorithm, user=USER).split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    error = refused(TokenVerifier(algorithm, public), f"{header}.{payload}.{flipped}")
    assert error.expired is False
    assert str(error) == "invalid signature"


def test_swapped_payload_is_refused(keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys["EdDSA"]
    header, _, signature = mint_token(private, "EdDSA", user=USER).split(".")
    forged = b64url(orjson.dumps({"user_id": "admin", "sub": "admin"}))
    assert (
        refused(TokenVerifier("EdDSA", public), f"{header}.{forged}.{signature}").expired is False
    )


def test_token_signed_by_another_key_is_refused(keys: dict[str, tuple[str, str]]) -> None:
    other_private, _ = generate_signing_key("EdDSA")
    token = mint_token(other_private, "EdDSA", user=USER)
    assert refused(TokenVerifier("EdDSA", keys["EdDSA"][1]), token).expired is False


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(keys: dict[str, tuple[str, str]], algorithm: str, alg: str) -> None:
    token = hand_built({"alg": alg, "typ": "JWT"}, {"sub": "admin", "exp": int(time.time()) - 10})
    error = refused(TokenVerifier(algorithm, keys[algorithm][1]), token)
    assert error.expired is False


def test_token_in_another_algorithm_is_refused(keys: dict[str, tuple[str, str]]) -> None:
    verifier = TokenVerifier("EdDSA", keys["EdDSA"][1])
    for algorithm in ("HS256", "RS256", "ES256"):
        token = mint_token(keys[algorithm][0], algorithm, user=USER)
        error = refused(verifier, token)
        assert (error.expired, str(error)) == (False, "algorithm not allowed")


@pytest.mark.parametrize("algorithm", ["EdDSA", "RS256", "ES256"])
def test_hs256_signed_with_the_public_key_is_refused(
    keys: dict[str, tuple[str, str]], algorithm: str
) -> None:
    # The classic confusion: the attacker uses the (public) verification key as an HMAC secret.
    public = keys[algorithm][1]

    def sign(data: bytes) -> bytes:
        return hmac.new(public.encode(), data, hashlib.sha256).digest()

    expired = {"sub": "admin", "exp": int(time.time()) - 10}
    for claims in ({"sub": "admin"}, expired):
        token = hand_built({"alg": "HS256", "typ": "JWT"}, claims, sign)
        error = refused(TokenVerifier(algorithm, public), token)
        assert error.expired is False


def test_nbf_in_the_future_is_refused_and_in_the_past_accepted(
    keys: dict[str, tuple[str, str]],
) -> None:
    private, public = keys["EdDSA"]
    verifier = TokenVerifier("EdDSA", public)
    later = mint_token(private, "EdDSA", user=USER, extra={"nbf": int(time.time()) + 120})
    error = refused(verifier, later)
    assert (error.expired, str(error)) == (False, "token not yet valid")
    earlier = mint_token(private, "EdDSA", user=USER, extra={"nbf": int(time.time()) - 120})
    assert verifier.verify_connection(earlier).user == USER


def test_iat_in_the_future_is_accepted(keys: dict[str, tuple[str, str]]) -> None:
    # golang-jwt v5 does not check iat: a Dex host with a fast clock must still work.
    private, public = keys["EdDSA"]
    token = mint_token(private, "EdDSA", user=USER, extra={"iat": int(time.time()) + 300})
    assert TokenVerifier("EdDSA", public).verify_connection(token).user == USER


@pytest.mark.parametrize(
    ("user", "extra", "expected"),
    [
        ("", {"user_id": "from-user-id", "sub": "from-sub"}, "from-user-id"),
        ("", {"sub": "from-sub"}, "from-sub"),
        ("", {"user_id": "", "sub": "from-sub"}, "from-sub"),
        ("", {"user_id": 42, "sub": "from-sub"}, "from-sub"),
        ("", {}, ""),
    ],
)
def test_user_id_wins_over_sub(
    keys: dict[str, tuple[str, str]], user: str, extra: dict[str, Any], expected: str
) -> None:
    private, public = keys["HS256"]
    token = mint_token(private, "HS256", user=user, extra=extra)
    credentials = TokenVerifier("HS256", public).verify_connection(token)
    assert credentials.user == expected
    assert credentials.anonymous is (expected == "")


def test_expire_at_overrides_exp(keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys["HS256"]
    verifier = TokenVerifier("HS256", public)
    soon = int(time.time()) + 100
    token = mint_token(private, "HS256", user=USER, extra={"expire_at": soon})
    assert verifier.verify_connection(token).expires_at == soon
    never = mint_token(private, "HS256", user=USER, extra={"expire_at": 0})
    assert verifier.verify_connection(never).expires_at == 0
    for bad in ("soon", -1, True, 1.5):
        token = mint_token(private, "HS256", user=USER, extra={"expire_at": bad})
        assert str(refused(verifier, token)) == "invalid expire_at claim"


def test_info_channels_and_project_ids_are_read(keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys["HS256"]
    verifier = TokenVerifier("HS256", public)
    extra = {
        "info": {"name": "Ada"},
        "channels": ["global", "task:*"],
        "project_ids": ["p1", 7],
    }
    credentials = verifier.verify_connection(mint_token(private, "HS256", user=USER, extra=extra))
    assert credentials.info == b'{"name":"Ada"}'
    assert credentials.channels == ("global", "task:*")
    assert credentials.server_side_channels == ("global",)
    assert credentials.project_ids == ("p1", "7")
    b64 = mint_token(private, "HS256", user=USER, extra={"b64info": "AAEC", "info": {"x": 1}})
    assert verifier.verify_connection(b64).info == b"\x00\x01\x02"
    bare = verifier.verify_connection(mint_token(private, "HS256", user=USER))
    assert (bare.info, bare.channels, bare.project_ids) == (None, (), ())


@pytest.mark.parametrize(
    "extra",
    [
        {"channels": "task:1"},
        {"channels": [1]},
        {"project_ids": [None]},
        {"b64info": "not base64!"},
        {"info": 2**70},
    ],
)
def test_malformed_claims_are_refused(
    keys: dict[str, tuple[str, str]], extra: dict[str, Any]
) -> None:
    private, public = keys["HS256"]
    token = mint_token(private, "HS256", user=USER, extra=extra)
    assert refused(TokenVerifier("HS256", public), token).expired is False


def test_connection_token_with_channel_claim_is_refused(
    keys: dict[str, tuple[str, str]],
) -> None:
    private, public = keys["EdDSA"]
    token = mint_token(private, "EdDSA", user=USER, extra={"channel": "task:1"})
    assert "channel claim" in str(refused(TokenVerifier("EdDSA", public), token))


def test_audience_and_issuer_checked_only_when_configured(
    keys: dict[str, tuple[str, str]],
) -> None:
    private, public = keys["EdDSA"]
    with_aud = mint_token(private, "EdDSA", user=USER, extra={"aud": "dex"})
    without_aud = mint_token(private, "EdDSA", user=USER)
    other_aud = mint_token(private, "EdDSA", user=USER, extra={"aud": "other"})
    other_iss = mint_token(private, "EdDSA", user=USER, issuer="someone")

    plain = TokenVerifier("EdDSA", public)
    for token in (with_aud, without_aud, other_aud, other_iss):
        assert plain.verify_connection(token).user == USER

    strict = TokenVerifier("EdDSA", public, audience="dex", issuer="poindexter")
    assert strict.verify_connection(with_aud).user == USER
    for token in (without_aud, other_aud, other_iss):
        refused(strict, token)


def test_garbage_is_refused_without_echoing_it(keys: dict[str, tuple[str, str]]) -> None:
    verifier = TokenVerifier("EdDSA", keys["EdDSA"][1])
    secretish = "eyJhbGciOiJFZERTQSJ9.c2VjcmV0LXBheWxvYWQ.c2ln"
    for token in ("", "abc", "a.b", "a.b.c.d", secretish, secretish + "!", "é.é.é"):
        with pytest.raises(TokenError) as info:
            verifier.verify_connection(token)
        assert info.value.expired is False
        assert not token or token not in str(info.value)
        assert "c2VjcmV0" not in str(info.value)


@given(st.text(max_size=300))
def test_any_text_raises_only_token_error(text: str) -> None:
    verifier = TokenVerifier("HS256", "s" * 32)
    with pytest.raises(TokenError):
        verifier.verify_connection(text)


@given(st.lists(st.binary(max_size=60), min_size=3, max_size=3))
def test_any_three_segments_raise_only_token_error(parts: list[bytes]) -> None:
    verifier = TokenVerifier("HS256", "s" * 32)
    with pytest.raises(TokenError):
        verifier.verify_connection(".".join(b64url(part) for part in parts))


# --- subscription tokens --------------------------------------------------------


def sub_token(keys: dict[str, tuple[str, str]], user: str = USER, **claims: Any) -> str:
    return mint_token(keys["EdDSA"][0], "EdDSA", user=user, extra=claims)


def test_subscription_token_grants_its_channel(keys: dict[str, tuple[str, str]]) -> None:
    verifier = TokenVerifier("EdDSA", keys["EdDSA"][1])
    token = sub_token(keys, channel="task:1", client="c1", info={"a": 1}, b64data="eyJ4Ijox")
    claims = verifier.verify_subscription(token, channel="task:1", user=USER, client="c1")
    assert (claims.user, claims.channel, claims.client) == (USER, "task:1", "c1")
    assert claims.info == b'{"a":1}'
    assert claims.data == b'{"x":1'
    assert claims.expires_at > time.time()
    unbound = sub_token(keys, channel="task:1", data=[1, 2])
    claims = verifier.verify_subscription(unbound, channel="task:1", user=USER, client="any")
    assert (claims.client, claims.data, claims.info) == ("", b"[1,2]", None)


@pytest.mark.parametrize(
    ("claims", "channel", "user", "client", "mismatch"),
    [
        ({"channel": "task:2"}, "task:1", USER, "c1", True),
        ({"channel": "task:1"}, "task:1", "someone-else", "c1", True),
        ({"channel": "task:1", "client": "c2"}, "task:1", USER, "c1", True),
        ({}, "task:1", USER, "c1", False),
        ({"channel": ""}, "", USER, "c1", False),
        ({"channel": "task:1", "client": 5}, "task:1", USER, "c1", False),
    ],
)
def test_subscription_token_mismatches_are_refused(
    keys: dict[str, tuple[str, str]],
    claims: dict[str, Any],
    channel: str,
    user: str,
    client: str,
    mismatch: bool,
) -> None:
    verifier = TokenVerifier("EdDSA", keys["EdDSA"][1])
    token = sub_token(keys, **claims)
    with pytest.raises(TokenError) as info:
        verifier.verify_subscription(token, channel=channel, user=user, client=client)
    assert (info.value.expired, info.value.mismatch) == (False, mismatch)


def test_anonymous_subscription_token_matches_anonymous_user(
    keys: dict[str, tuple[str, str]],
) -> None:
    verifier = TokenVerifier("EdDSA", keys["EdDSA"][1])
    token = sub_token(keys, user="", channel="news")
    assert verifier.verify_subscription(token, channel="news", user="", client="c").user == ""
    with pytest.raises(TokenError):
        verifier.verify_subscription(token, channel="news", user=USER, client="c")


def test_expired_subscription_token_is_marked_expired(keys: dict[str, tuple[str, str]]) -> None:
    verifier = TokenVerifier("EdDSA", keys["EdDSA"][1])
    token = mint_token(keys["EdDSA"][0], "EdDSA", user=USER, ttl_seconds=-1, extra={"channel": "a"})
    with pytest.raises(TokenError) as info:
        verifier.verify_subscription(token, channel="a", user=USER, client="c")
    assert info.value.expired is True


# --- configuration --------------------------------------------------------------


def test_from_settings_prefers_the_key_file(
    keys: dict[str, tuple[str, str]], tmp_path: Path
) -> None:
    private, public = keys["RS256"]
    key_file = tmp_path / "key.pem"
    key_file.write_text(public)
    settings = Settings(
        token_algorithm="RS256",
        token_key=keys["EdDSA"][1],  # wrong on purpose: the file must win
        token_key_file=str(key_file),
        token_audience="dex",
        token_issuer="poindexter",
    )
    verifier = TokenVerifier.from_settings(settings)
    good = mint_token(private, "RS256", user=USER, extra={"aud": "dex"})
    assert verifier.verify_connection(good).user == USER
    refused(verifier, mint_token(private, "RS256", user=USER))  # no aud


def test_from_settings_reads_an_hmac_secret_file_without_its_newline(tmp_path: Path) -> None:
    secret = "x" * 40
    key_file = tmp_path / "secret"
    key_file.write_text(secret + "\n")
    settings = Settings(token_algorithm="HS256", token_key_file=str(key_file))
    token = mint_token(secret, "HS256", user=USER)
    assert TokenVerifier.from_settings(settings).verify_connection(token).user == USER


def test_from_settings_without_a_key_does_not_guess(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="token_key"):
        TokenVerifier.from_settings(Settings())
    missing = Settings(token_key_file=str(tmp_path / "absent.pem"))
    with pytest.raises(ConfigError, match="token_key_file"):
        TokenVerifier.from_settings(missing)


@pytest.mark.parametrize(
    ("algorithm", "key_of"),
    [
        ("HS256", lambda keys: keys["EdDSA"][1]),  # PEM as an HMAC secret
        ("HS256", lambda keys: "short"),
        ("EdDSA", lambda keys: keys["RS256"][1]),
        ("ES256", lambda keys: keys["EdDSA"][1]),
        ("RS256", lambda keys: keys["HS256"][1]),
        ("PS256", lambda keys: keys["RS256"][1]),
        ("none", lambda keys: ""),
    ],
)
def test_unusable_key_or_algorithm_is_a_config_error(
    keys: dict[str, tuple[str, str]], algorithm: str, key_of: Any
) -> None:
    with pytest.raises(ConfigError):
        TokenVerifier(algorithm, key_of(keys))


def test_credentials_default_to_an_anonymous_never_expiring_identity() -> None:
    credentials = Credentials(user="")
    assert credentials.anonymous
    assert (credentials.expires_at, credentials.channels, dict(credentials.claims)) == (0, (), {})


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("shift", [-300, 300])
def test_time_claims_given_as_strings_are_malformed(
    keys: dict[str, tuple[str, str]], claim: str, shift: int
) -> None:
    # RFC 7519 NumericDate is a JSON number; golang-jwt refuses "1700000000", whether
    # the time it names is past or future (so a string exp is never "expired").
    private, public = keys["EdDSA"]
    when = int(time.time()) + shift
    token = mint_token(private, "EdDSA", user=USER, ttl_seconds=None, extra={claim: str(when)})
    error = refused(TokenVerifier("EdDSA", public), token)
    assert (error.expired, str(error)) == (False, "malformed token")


@pytest.mark.parametrize("value", [True, [1], {"t": 1}])
def test_time_claims_that_are_not_numbers_are_malformed(
    keys: dict[str, tuple[str, str]], value: Any
) -> None:
    private, public = keys["HS256"]
    verifier = TokenVerifier("HS256", public)
    for claim in ("exp", "nbf", "iat"):
        token = mint_token(private, "HS256", user=USER, ttl_seconds=None, extra={claim: value})
        assert str(refused(verifier, token)) == "malformed token", claim


def test_fractional_numeric_dates_are_valid(keys: dict[str, tuple[str, str]]) -> None:
    private, public = keys["HS256"]
    verifier = TokenVerifier("HS256", public)
    now = time.time()
    extra = {"exp": now + 60.5, "nbf": now - 0.5, "iat": now - 0.25}
    token = mint_token(private, "HS256", user=USER, ttl_seconds=None, extra=extra)
    assert verifier.verify_connection(token).expires_at == int(now + 60.5)
    gone = mint_token(private, "HS256", user=USER, ttl_seconds=None, extra={"exp": now - 0.5})
    assert refused(verifier, gone).expired is True
