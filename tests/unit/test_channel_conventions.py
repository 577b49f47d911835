"""Centrifugo's channel conventions: user-limited channels (`#`), the personal
channel in Centrifugo's shape, and namespace options under Centrifugo's names."""

from __future__ import annotations

import pytest

from adapters.auth.jwt import Credentials
from shim.core.config import ConfigError, NamespaceOptions, Settings, load_settings
from shim.core.policy import AllowAuthenticated, ChannelAuthorizer, ClaimsPolicy, limited_to


def who(user: str) -> Credentials:
    return Credentials(user=user)


def authorizer(**options: object) -> ChannelAuthorizer:
    settings = load_settings(
        env={},
        namespaces={
            "": NamespaceOptions(allow_user_limited_channels=True),
            "dialog": NamespaceOptions(allow_user_limited_channels=True),
            "personal": NamespaceOptions(),
            "task": NamespaceOptions(),
        },
        **options,
    )
    return ChannelAuthorizer.from_settings(settings)


def test_limited_to_reads_the_users_after_the_last_boundary() -> None:
    assert limited_to("dialog#42,43") == ["42", "43"]
    assert limited_to("#42") == ["42"]
    assert limited_to("chat:room#a#b,c") == ["b", "c"]
    assert limited_to("task:42") is None


@pytest.mark.parametrize(
    ("channel", "user", "allowed"),
    [
        ("dialog#42,43", "42", True),
        ("dialog#42,43", "43", True),
        ("dialog#42,43", "44", False),
        ("dialog#42,43", "", False),
        ("#42", "42", True),
        ("#42", "4", False),
        ("dialog:talk#7,8", "8", True),
        ("dialog:talk#7,8", "9", False),
    ],
)
def test_user_limited_channels_are_for_listed_users_only(
    channel: str, user: str, allowed: bool
) -> None:
    decision = authorizer().decide_now(who(user), channel)
    assert decision is not None and decision.allowed is allowed


def test_user_limited_rule_wins_over_a_token_grant_but_only_where_allowed() -> None:
    # The claims policy would grant `dialog:*`; the boundary still decides.
    limited = ChannelAuthorizer(ClaimsPolicy(), user_limited_namespaces=frozenset({"dialog"}))
    granted = Credentials(user="9", channels=("dialog:*",))
    denied = limited.decide_now(granted, "dialog:x#7,8")
    assert denied is not None and not denied.allowed
    # In a namespace without allow_user_limited_channels, `#` is an ordinary character.
    plain = ChannelAuthorizer(AllowAuthenticated())
    assert plain.user_limited("task:x#7") is False
    decision = plain.decide_now(who("9"), "task:x#7")
    assert decision is not None and decision.allowed


def test_centrifugo_personal_channel_beside_the_user_prefix() -> None:
    off = authorizer()
    assert off.personal_channels("42") == ["user:42"]
    top = authorizer(user_subscribe_to_personal=True)
    assert top.personal_channels("42") == ["user:42", "#42"]
    spaced = authorizer(user_subscribe_to_personal=True, user_personal_channel_namespace="personal")
    assert spaced.personal_channels("42") == ["user:42", "personal:#42"]
    assert spaced.personal_channels("") == []
    assert spaced.foreign_personal_channel("personal:#43", "42")
    assert not spaced.foreign_personal_channel("personal:#42", "42")
    assert spaced.never_granted("personal:#43", "42")
    # Not personal: a list of users is a user-limited channel, and other namespaces.
    assert not spaced.personal("personal:#42,43")
    assert not spaced.personal("dialog#43")
    # No namespace allows user-limited channels there, yet another user's is refused.
    denied = spaced.decide_now(who("42"), "personal:#43")
    assert denied is not None and not denied.allowed
    own = spaced.decide_now(who("42"), "personal:#42")
    assert own is not None and own.allowed


def test_personal_namespace_must_exist() -> None:
    with pytest.raises(ConfigError, match="user_personal_channel_namespace"):
        load_settings(
            env={}, user_subscribe_to_personal=True, user_personal_channel_namespace="nope"
        )


def test_centrifugo_namespace_list_and_option_names() -> None:
    settings = load_settings(
        env={
            "DEX_SHIM_NAMESPACES": """[
                {"name": "", "history_size": 0},
                {"name": "chat", "history_size": 50, "history_ttl": "1h30m",
                 "allow_user_limited_channels": true, "allowed_delta_types": ["fossil"],
                 "force_recovery": true, "presence": false}
            ]""",
            "DEX_SHIM_USER_SUBSCRIBE_TO_PERSONAL": "true",
            "DEX_SHIM_USER_PERSONAL_CHANNEL_NAMESPACE": "chat",
        }
    )
    chat = settings.namespaces["chat"]
    assert (chat.history_size, chat.history_ttl_seconds) == (50, 5400.0)
    assert chat.allow_user_limited_channels and chat.allowed_delta_types == ("fossil",)
    assert not chat.presence and settings.namespaces[""].history_size == 0
    assert (
        settings.user_subscribe_to_personal and settings.user_personal_channel_namespace == "chat"
    )


@pytest.mark.parametrize(
    ("raw", "seconds"), [("300s", 300.0), ("500ms", 0.5), ("2m", 120.0), (45, 45.0)]
)
def test_history_ttl_durations(raw: object, seconds: float) -> None:
    settings = load_settings(env={}, namespaces={"task": {"history_ttl": raw}})
    assert settings.namespaces["task"].history_ttl_seconds == seconds


@pytest.mark.parametrize("raw", ["5 minutes", "10", "1d"])
def test_bad_durations_are_config_errors(raw: str) -> None:
    with pytest.raises(ConfigError, match="history_ttl"):
        load_settings(env={}, namespaces={"task": {"history_ttl": raw}})


def test_both_spellings_at_once_is_an_error() -> None:
    with pytest.raises(ConfigError, match="both history_ttl"):
        load_settings(env={}, namespaces={"task": {"history_ttl": "1s", "history_ttl_seconds": 1}})


def test_defaults_keep_todays_behaviour() -> None:
    settings = Settings()
    assert not settings.user_subscribe_to_personal
    assert not any(o.allow_user_limited_channels for o in settings.namespaces.values())
