# Names vulture (`make lint`) cannot see used. Routes need no entry: pyproject's
# [tool.vulture] ignores functions under `@app.*` / `@blueprint.*` decorators.
# This file is only parsed by vulture, never run.
# ruff: noqa

# Counters read by name when /metrics is scraped (shim.app.metrics: getattr(stats, kind)).
_.acquired
_.consumed
_.fenced
_.skipped_already_published
_.limited_subscriptions
_.frames_sent

# State tests and operators observe.
_.remembered_events  # legacy de-duplication memory, bounded (tests/unit/test_legacy_session.py)
_.metrics_port  # the internal listener's port, read by tests and logged

# Centrifuge protocol codes: the full table, including the codes we never send.
_.reconnect
_.resubscribe
WRITE_ERROR
FORCE_RECONNECT
CHANNEL_LIMIT
INAPPROPRIATE_PROTOCOL
DISCONNECT_NOT_AVAILABLE

# Set for hypercorn, which reads them: its Config and WebSocket stream attributes, and the
# queue/event methods its protocol code calls on our lean replacements.
_.websocket_max_message_size
_.websocket_ping_interval
_.accesslog
_.errorlog
_.graceful_timeout
_.h11_connection
_.spawn_app
_.event_class
_.qsize
_.put_nowait
_.is_set
