"""CPU cost of the publication push per codec and of fossil delta, side by side in
one run (machines are noisy: read the ratios).

    .venv/bin/python -m bench.codec_cost

Per publication (paid once, whatever the number of subscribers): the push encoded
for JSON and for Protobuf, and the fossil delta against the previous publication.
Per delivery (paid per subscriber): what a subscriber's `deliver` adds on the fan-out
path to take the shared bytes, without and with delta. The payload is Dex's growing
assistant message (tests/streams.py) at update 100 of 200.
"""

from __future__ import annotations

import timeit

import orjson

from shim.centrifuge.fanout import PreparedPublication
from shim.centrifuge.wire import JSON, PROTOBUF, fossil_patch
from shim.core.broker import Publication
from tests.streams import content_event

SUBSCRIBERS = 1000


def best(stmt: object, number: int) -> float:
    """Seconds per call, best of 5 repeats."""
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number  # type: ignore[arg-type]


def main() -> None:
    previous = Publication(orjson.dumps(content_event("q1", 99)["payload"]), offset=99)
    current = Publication(orjson.dumps(content_event("q1", 100)["payload"]), offset=100)
    channel = "quest:q1"
    rows = {
        "push encode, JSON": best(lambda: JSON.publication_push(channel, current), 20000),
        "push encode, Protobuf": best(lambda: PROTOBUF.publication_push(channel, current), 20000),
        "fossil delta create": best(lambda: fossil_patch(previous.data, current.data), 2000),
        "delta push encode, JSON": best(
            lambda: PreparedPublication(channel, current, previous).delta_push(JSON, previous), 2000
        ),
        "delta push encode, Protobuf": best(
            lambda: PreparedPublication(channel, current, previous).delta_push(PROTOBUF, previous),
            2000,
        ),
    }

    def fan_out(delta: bool) -> None:
        prepared = PreparedPublication(channel, current, previous)
        for _ in range(SUBSCRIBERS):
            if delta:
                prepared.delta_push(JSON, previous)
            else:
                prepared.push(JSON)

    plain = best(lambda: fan_out(False), 50) / SUBSCRIBERS
    with_delta = best(lambda: fan_out(True), 50) / SUBSCRIBERS
    anchor = rows["push encode, JSON"]
    print(f"payload {len(current.data)} B (previous {len(previous.data)} B)")
    print("per publication (once per publication, shared):")
    for name, seconds in rows.items():
        print(f"  {name:<30} {seconds * 1e6:8.2f} us   {seconds / anchor:5.2f}x JSON push")
    print(f"per delivery, {SUBSCRIBERS} subscribers, encodings included once:")
    print(f"  {'without delta':<30} {plain * 1e6:8.3f} us")
    print(
        f"  {'with delta (all in sync)':<30} {with_delta * 1e6:8.3f} us   {with_delta / plain:5.2f}x"
    )


if __name__ == "__main__":
    main()
