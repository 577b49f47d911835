"""Connection and subscription JWTs: verification (PyJWT + cryptography) and dev helpers.

Claims follow Centrifugo's conventions (sub, exp, expire_at, info/b64info, channels,
channel, client, data/b64data) plus the Dex product's `user_id` and our `project_ids`.
Validation mirrors the legacy server (golang-jwt v5): only the configured algorithm,
signature before claims, `exp` only when present and without leeway, `nbf` checked,
`iat` not checked (a Dex clock slightly ahead must not lock users out). `exp`, `nbf`
and `iat` must be JSON numbers when present (RFC 7519 NumericDate): a string is a
malformed token, as golang-jwt has it, where PyJWT alone would read "123" as 123.

Error messages are fixed strings: no token, and no PyJWT text that could quote one,
ever reaches a TokenError (and so a log line).
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import jwt
import orjson
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from shim.core.auth import Credentials, SubscriptionClaims, TokenError, no_claims
from shim.core.config import ConfigError
from shim.core.jsonbytes import dumps_kept

if TYPE_CHECKING:
    from shim.core.config import Settings

ALGORITHMS = ("EdDSA", "HS256", "RS256", "ES256")
# RFC 7518 3.2 (HMAC key >= hash size) and NIST SP 800-131A (RSA >= 2048 bits); checked
# once here so PyJWT never has to warn per token.
_MIN_HMAC_BYTES = 32
_MIN_RSA_BITS = 2048

_PublicKey = ed25519.Ed25519PublicKey | rsa.RSAPublicKey | ec.EllipticCurvePublicKey
_PrivateKey = ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# Claims the verifier has already checked or turned into fields; a connection keeps
# only the others (what a custom policy may look at), since every idle socket holds
# its credentials.
_CONSUMED_CLAIMS = frozenset(
    {
        "sub",
        "user_id",
        "exp",
        "expire_at",
        "iat",
        "nbf",
        "jti",
        "iss",
        "aud",
        "info",
        "b64info",
        "channels",
        "project_ids",
    }
)


def _custom_claims(claims: dict[str, Any]) -> Mapping[str, Any]:
    custom = {k: v for k, v in claims.items() if k not in _CONSUMED_CLAIMS}
    return MappingProxyType(custom) if custom else no_claims()


# Most specific first: InvalidSignatureError is a DecodeError.
_MESSAGES: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidSignatureError, "invalid signature"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "invalid audience"),
    (jwt.InvalidIssuerError, "invalid issuer"),
    (jwt.exceptions.InvalidSubjectError, "invalid sub claim"),
    (jwt.MissingRequiredClaimError, "missing required claim"),
    (jwt.DecodeError, "malformed token"),
)


def _describe(exc: jwt.PyJWTError) -> str:
    for kind, message in _MESSAGES:
        if isinstance(exc, kind):
            return message
    return "invalid token"


class TokenVerifier:
    """Verifies tokens signed with one configured algorithm and key."""

    __slots__ = ("_algorithm", "_audience", "_issuer", "_jwt", "_key", "_leeway")

    def __init__(
        self,
        algorithm: str,
        key: str | bytes,
        *,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0,
    ) -> None:
        _check_algorithm(algorithm)
        self._algorithm = algorithm
        self._key: _PublicKey | bytes = _verification_key(algorithm, key)
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._jwt = jwt.PyJWT(
            options={
                "verify_iat": False,
                # Checked by _check_times, once their type is known to be a NumericDate.
                "verify_exp": False,
                "verify_nbf": False,
                # PyJWT refuses any token with `aud` when no audience is given; we
                # check `aud` only when one is configured (Centrifugo does the same).
                "verify_aud": bool(audience),
                "enforce_minimum_key_length": True,
            }
        )

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """Build from token_* settings; token_key_file wins over token_key."""
        key: str | bytes
        if settings.token_key_file:
            path = Path(settings.token_key_file)
            try:
                key = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"token_key_file: cannot read {path}: {exc.strerror}") from None
            if settings.token_algorithm == "HS256":
                # Editors and `echo` end files with a newline that is not part of the secret.
                key = key.rstrip(b"\r\n")
        elif settings.token_key:
            key = settings.token_key
        else:
            raise ConfigError(
                "token_key / token_key_file: no verification key configured "
                "(set one, or let the app generate a development key pair)"
            )
        return cls(
            settings.token_algorithm,
            key,
            audience=settings.token_audience,
            issuer=settings.token_issuer,
        )

    def verify_connection(self, token: str) -> Credentials:
        """Credentials of a connection token; raises TokenError."""
        claims = self._decode(token)
        # A subscription token must not open a connection (Centrifugo rule).
        if "channel" in claims:
            raise TokenError("connection token must not carry a channel claim")
        return Credentials(
            user=_user_of(claims),
            expires_at=_expiry_of(claims),
            info=_raw_claim(claims, "info", "b64info"),
            channels=_strings(claims, "channels"),
            project_ids=_strings(claims, "project_ids", numbers=True),
            claims=_custom_claims(claims),
        )

    def verify_subscription(
        self, token: str, *, channel: str, user: str, client: str
    ) -> SubscriptionClaims:
        """Claims of a subscription token for `channel`, held by `user` on `client`."""
        claims = self._decode(token)
        token_channel = claims.get("channel")
        if not isinstance(token_channel, str) or not token_channel:
            raise TokenError("subscription token has no channel claim")
        if token_channel != channel:
            raise TokenError("subscription token is for another channel", mismatch=True)
        token_user = _user_of(claims)
        if token_user != user:
            raise TokenError("subscription token is for another user", mismatch=True)
        token_client = claims.get("client", "")
        if not isinstance(token_client, str):
            raise TokenError("invalid client claim")
        if token_client and token_client != client:
            raise TokenError("subscription token is for another client", mismatch=True)
        return SubscriptionClaims(
            user=token_user,
            channel=token_channel,
            client=token_client,
            expires_at=_expiry_of(claims),
            info=_raw_claim(claims, "info", "b64info"),
            data=_raw_claim(claims, "data", "b64data"),
        )

    def channel_claim(self, token: str) -> str:
        """The `channel` claim read without verifying (see Authenticator)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return ""
        channel = claims.get("channel")
        return channel if isinstance(channel, str) else ""

    def _decode(self, token: str) -> dict[str, Any]:
        if not token:
            raise TokenError("empty token")
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._audience or None,
                issuer=self._issuer or None,
            )
        # `from None`: the chained PyJWT exception is not ours to vouch for.
        except jwt.PyJWTError as exc:
            raise TokenError(_describe(exc)) from None
        except (ValueError, TypeError):
            raise TokenError("malformed token") from None
        _check_times(claims, time.time(), self._leeway)
        return claims


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    """The time claims of a verified token, in PyJWT's order (nbf, then exp), after
    each present one is checked to be a NumericDate."""
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if value is not None and not _numeric_date(value):
            raise TokenError("malformed token")
    nbf = claims.get("nbf")
    if nbf is not None and nbf > now + leeway:
        raise TokenError("token not yet valid")
    exp = claims.get("exp")
    if exp is not None and exp <= now - leeway:
        raise TokenError("token expired", expired=True)


def _numeric_date(value: object) -> bool:
    # JSON true/false are not numbers, though Python's bool is an int; Python's json
    # reads NaN and Infinity, which JSON does not have.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _user_of(claims: Mapping[str, Any]) -> str:
    user_id = claims.get("user_id")
    if isinstance(user_id, str) and user_id:
        return user_id
    sub = claims.get("sub")  # PyJWT has checked it is a string when present
    return sub if isinstance(sub, str) else ""


def _expiry_of(claims: Mapping[str, Any]) -> int:
    expire_at = claims.get("expire_at")
    if expire_at is not None:
        if isinstance(expire_at, bool) or not isinstance(expire_at, int) or expire_at < 0:
            raise TokenError("invalid expire_at claim")
        return expire_at
    exp = claims.get("exp")
    return 0 if exp is None else int(exp)  # _check_times has checked it is a number


def _raw_claim(claims: Mapping[str, Any], name: str, b64_name: str) -> bytes | None:
    encoded = claims.get(b64_name)
    if encoded is not None:
        if not isinstance(encoded, str):
            raise TokenError(f"invalid {b64_name} claim")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise TokenError(f"invalid {b64_name} claim") from None
    value = claims.get(name)
    if value is None:
        return None
    try:
        return dumps_kept(value)
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits
        raise TokenError(f"invalid {name} claim") from None


def _strings(claims: Mapping[str, Any], name: str, *, numbers: bool = False) -> tuple[str, ...]:
    value = claims.get(name)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TokenError(f"invalid {name} claim")
    items: list[str] = []
    for item in value:
        if isinstance(item, str):
            items.append(item)
        elif numbers and isinstance(item, int) and not isinstance(item, bool):
            items.append(str(item))
        else:
            raise TokenError(f"invalid {name} claim")
    return tuple(items)


# --- keys -----------------------------------------------------------------------


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"token_algorithm: unsupported {algorithm!r}, expected one of {ALGORITHMS}"
        )


def _hmac_secret(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if raw.lstrip().startswith(b"-----BEGIN"):
        raise ConfigError("token key: HS256 needs a shared secret, not a PEM key")
    if len(raw) < _MIN_HMAC_BYTES:
        raise ConfigError(f"token key: HS256 secret must be at least {_MIN_HMAC_BYTES} bytes")
    return raw


def _check_key_type(algorithm: str, public: object) -> _PublicKey:
    if algorithm == "EdDSA" and isinstance(public, ed25519.Ed25519PublicKey):
        return public
    if algorithm == "RS256" and isinstance(public, rsa.RSAPublicKey):
        if public.key_size < _MIN_RSA_BITS:
            raise ConfigError(f"token key: RSA key must be at least {_MIN_RSA_BITS} bits")
        return public
    if (
        algorithm == "ES256"
        and isinstance(public, ec.EllipticCurvePublicKey)
        and isinstance(public.curve, ec.SECP256R1)
    ):
        return public
    expected = {"EdDSA": "an Ed25519", "RS256": "an RSA", "ES256": "a P-256 EC"}[algorithm]
    raise ConfigError(f"token key: {algorithm} needs {expected} key")


def _verification_key(algorithm: str, key: str | bytes) -> _PublicKey | bytes:
    if algorithm == "HS256":
        return _hmac_secret(key)
    raw = key.encode() if isinstance(key, str) else bytes(key)
    try:
        if b"PRIVATE KEY-----" in raw:
            public: object = serialization.load_pem_private_key(raw, password=None).public_key()
        elif b"-----BEGIN CERTIFICATE-----" in raw:
            public = x509.load_pem_x509_certificate(raw).public_key()
        else:
            public = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("token key: not a readable PEM key or certificate") from None
    return _check_key_type(algorithm, public)


def _signing_key(algorithm: str, key: str) -> _PrivateKey | bytes:
    if algorithm == "HS256":
        return _hmac_secret(key)
    try:
        private = serialization.load_pem_private_key(key.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("signing key: not a readable unencrypted PEM private key") from None
    _check_key_type(algorithm, private.public_key())
    if not isinstance(private, _PrivateKey):  # narrows the type; the line above checked it
        raise ConfigError(f"signing key: {algorithm} needs a matching private key")
    return private


# --- development helpers ----------------------------------------------------------


def generate_signing_key(algorithm: str) -> tuple[str, str]:
    """A fresh (signing key, verification key): PEM pair, or the same secret twice for HS256."""
    _check_algorithm(algorithm)
    if algorithm == "HS256":
        secret = secrets.token_urlsafe(48)
        return secret, secret
    private: _PrivateKey
    if algorithm == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        private = ec.generate_private_key(ec.SECP256R1())
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem.decode(), public_pem.decode()


_SIGNER = jwt.PyJWT(options={"enforce_minimum_key_length": True})


def mint_token(
    signing_key: str,
    algorithm: str,
    *,
    user: str,
    ttl_seconds: int | None = 3600,
    issuer: str = "poindexter",
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A token shaped like Dex's: claims user_id, iss, sub, exp, iat in that order (empty
    user or issuer leaves its claims out; no exp when ttl_seconds is None), then `extra`.
    """
    _check_algorithm(algorithm)
    key = _signing_key(algorithm, signing_key)
    now = int(time.time())
    claims: dict[str, Any] = {}
    if user:
        claims["user_id"] = user
    if issuer:
        claims["iss"] = issuer
    if user:
        claims["sub"] = user
    if ttl_seconds is not None:
        claims["exp"] = now + ttl_seconds
    claims["iat"] = now
    if extra:
        claims.update(extra)
    # PyJWT sorts header keys: {"alg":"EdDSA","typ":"JWT"}, as Go emits it.
    return _SIGNER.encode(claims, key, algorithm=algorithm)
