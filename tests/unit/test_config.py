from __future__ import annotations

from pathlib import Path

import pytest

from shim.core.config import (
    ConfigError,
    NamespaceOptions,
    RouteRule,
    describe_settings,
    load_settings,
)


def test_defaults_need_no_file_or_environment() -> None:
    settings = load_settings(env={})
    assert settings.engine == "memory"
    assert settings.client_queue_max_size_bytes == 2 * 1024 * 1024
    assert settings.websocket_write_timeout_seconds == 5.0
    assert settings.client_ping_interval_seconds == 25.0
    assert settings.websocket_compression is False
    assert settings.namespace_for("task:42") == NamespaceOptions()
    assert settings.namespace_for("plain") == NamespaceOptions()
    assert settings.namespace_for("nosuch:1") is None


def test_toml_file_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "shim.toml"
    path.write_text(
        """
port = 9100
client_queue_max_size_bytes = 65536
websocket_compression = true

[namespaces.task]
history_size = 10
history_ttl_seconds = 30
join_leave = true

[namespaces.chat]
allow_publish_for_subscriber = true

[[routes]]
match = "task."
channels = ["task:{task_id}"]
"""
    )
    env = {"DEX_SHIM_PORT": "9200", "DEX_SHIM_WEBSOCKET_COMPRESSION": "off"}
    settings = load_settings(path, env=env, host="0.0.0.0")
    assert settings.port == 9200  # the environment wins over the file
    assert settings.websocket_compression is False
    assert settings.client_queue_max_size_bytes == 65536
    assert settings.host == "0.0.0.0"
    assert settings.namespaces["task"] == NamespaceOptions(
        history_size=10, history_ttl_seconds=30.0, join_leave=True
    )
    assert settings.namespaces["chat"].allow_publish_for_subscriber is True
    assert "quest" not in settings.namespaces  # a file's table replaces the defaults
    assert settings.routes == (RouteRule("task.", ("task:{task_id}",)),)


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text("engine = 'redis'\nredis_url = 'redis://127.0.0.1:6390/0'\n")
    settings = load_settings(env={"DEX_SHIM_CONFIG": str(path)})
    assert settings.engine == "redis"
    assert settings.redis_url == "redis://127.0.0.1:6390/0"


def test_namespaces_from_json_environment() -> None:
    env = {"DEX_SHIM_NAMESPACES": '{"": {"presence": false}, "task": {"history_size": 0}}'}
    settings = load_settings(env=env)
    assert settings.namespaces[""].presence is False
    assert settings.namespaces["task"].history_enabled is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DEX_SHIM_PORT": "eighty"}, "port"),
        ({"DEX_SHIM_WEBSOCKET_COMPRESSION": "maybe"}, "websocket_compression"),
        ({"DEX_SHIM_ENGINE": "postgres"}, "engine"),
        ({"DEX_SHIM_TOKEN_ALGORITHM": "none"}, "token_algorithm"),
        ({"DEX_SHIM_CHANNEL_POLICY": "http"}, "channel_policy_url"),
        ({"DEX_SHIM_CUTOVER_MODE": "half"}, "cutover_mode"),
        ({"DEX_SHIM_CUTOVER_CHANNELS_PERCENT": "101"}, "cutover_channels_percent"),
        ({"DEX_SHIM_WEBSOCKET_MAX_FRAME_BYTES": str(2 * 1024 * 1024)}, "websocket_max_frame_bytes"),
        ({"DEX_SHIM_NAMESPACES": '{"task": {"histroy_size": 1}}'}, "unknown keys"),
        ({"DEX_SHIM_INGEST_STREAM_PARTITIONS": "0"}, "ingest_stream_partitions"),
        (
            {"DEX_SHIM_INGEST_STREAM_KEY": "dex:ingest", "DEX_SHIM_REDIS_CLUSTER": "true"},
            "hash tag",
        ),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_a_hash_tagged_stream_key_is_accepted_on_a_cluster() -> None:
    env = {"DEX_SHIM_INGEST_STREAM_KEY": "{dex-ingest}", "DEX_SHIM_REDIS_CLUSTER": "true"}
    assert load_settings(env=env).ingest_stream_key == "{dex-ingest}"


def test_unknown_setting_in_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text("client_queue_max_size = 1\n")
    with pytest.raises(ConfigError, match="client_queue_max_size"):
        load_settings(path, env={})


def test_every_scalar_setting_is_documented() -> None:
    described = describe_settings()
    assert described, "no settings described"
    undocumented = [name for name, _default, doc in described if not doc]
    assert undocumented == []
    names = {name for name, _default, _doc in described}
    assert {"client_queue_max_size_bytes", "websocket_write_timeout_seconds"} <= names
