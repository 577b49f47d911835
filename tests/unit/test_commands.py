"""The legacy command parser against what Go's encoding/json made of the same frames.

Expected values are written out by hand from the Go semantics in
legacy-hub-protocol.md §3: keys match case-insensitively (Unicode simple folding,
so the long s and the Kelvin sign match too), the last of duplicate keys wins, a
null value leaves the field as it was, and action values are case-sensitive.
"""

from __future__ import annotations

import pytest

from legacy.commands import LegacyCommand, MalformedCommand, parse_command


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ('{"action":"subscribe","TASK_ID":"T1"}', LegacyCommand("subscribe", task_id="T1")),
        ('{"ACTION":"subscribe","Project_Id":"P1"}', LegacyCommand("subscribe", project_id="P1")),
        ('{"AcTiOn":"unsubscribe","tAsK_iD":"T"}', LegacyCommand("unsubscribe", task_id="T")),
        # U+017F (long s) folds to "s", U+212A (Kelvin sign) to "k", as in Go.
        ('{"action":"subscribe","ta\u017fk_id":"T"}', LegacyCommand("subscribe", task_id="T")),
        ('{"action":"subscribe","tas\u212a_id":"T"}', LegacyCommand("subscribe", task_id="T")),
        # Duplicates: the last wins, whatever the case of each spelling.
        ('{"task_id":"a","action":"subscribe","TASK_ID":"b"}', LegacyCommand("subscribe", "b")),
        ('{"action":"subscribe_all","Action":"unsubscribe_all"}', LegacyCommand("unsubscribe_all")),
        (
            '{"project_id":"p1","PROJECT_ID":"p2","project_id":"p3"}',
            LegacyCommand(project_id="p3"),
        ),
        # null sets nothing: not even over an earlier value of the same field.
        ('{"action":"subscribe","task_id":null}', LegacyCommand("subscribe")),
        ('{"action":"subscribe","task_id":"a","TASK_ID":null}', LegacyCommand("subscribe", "a")),
        ('{"action":null,"project_id":null}', LegacyCommand()),
        ("null", LegacyCommand()),
        # Unknown keys are ignored, whatever their value.
        ('{"action":"subscribe_all","extra":[1,{"x":null}]}', LegacyCommand("subscribe_all")),
        # Empty strings are values like any other (subscribe then does nothing).
        ('{"action":"subscribe","task_id":""}', LegacyCommand("subscribe")),
        (b'{"action":"subscribe","task_id":"T"}', LegacyCommand("subscribe", task_id="T")),
    ],
)
def test_parse_follows_go_decoding(frame: str | bytes, expected: LegacyCommand) -> None:
    assert parse_command(frame) == expected


@pytest.mark.parametrize(
    "action", ["SUBSCRIBE_ALL", "Subscribe_All", "subscribe_ALL", " subscribe_all", "Subscribe"]
)
def test_action_values_are_kept_as_sent(action: str) -> None:
    # Keys fold, values do not: the session then finds no such action.
    assert parse_command(f'{{"action":"{action}"}}').action == action


@pytest.mark.parametrize(
    "frame",
    [
        '{"action":"subscribe","TASK_ID":1}',
        '{"action":"subscribe","task_id":"a","Task_Id":true}',
        '{"ACTION":["subscribe_all"]}',
        '{"action":"subscribe","project_id":{"id":"p"}}',
        '{"action":"subscribe_all"} {}',
        '{"action":NaN}',
        "",
        "[]",
    ],
)
def test_a_wrong_type_under_any_spelling_drops_the_whole_command(frame: str) -> None:
    with pytest.raises(MalformedCommand):
        parse_command(frame)
