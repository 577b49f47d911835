"""Turning load-generator results into markdown tables, target verdicts and a chart.

Pure functions over the result dicts the runner collects (one per system and case,
as the Go load generator printed them, plus `label` and `case`); only `chart`
writes a file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Result = dict[str, Any]

LABELS = {
    "centrifuge": "Go Centrifuge 0.15 (the anchor, protocol v1)",
    "channel": "shim, channel protocol",
    "legacy": "shim, legacy protocol",
    "delay10": "shim, channel protocol, client_write_delay 10 ms",
    "redis1": "shim, 1 node over Redis (channel protocol)",
    "redis2": "shim, 2 nodes over Redis (channel protocol)",
    "workers2": "shim, serve --workers 2 over Redis (channel protocol)",
    "socketio": "python-socketio room (uvicorn)",
    "ws": "websockets.broadcast, pre-encoded (ceiling)",
}
SYSTEMS = tuple(LABELS)
# "<system>@base": that shim system running another checkout's code (run.py --baseline).
BASELINE_SUFFIX = "@base"
SHIM_SYSTEMS = ("channel", "legacy", "delay10", "redis1", "redis2", "workers2")
# Every figure is also given as a ratio to this system's, measured in the same run.
ANCHOR = "centrifuge"
# The case the targets are stated at.
TARGET_CASE = "1,000"


@dataclass(slots=True, frozen=True)
class Case:
    subscribers: int
    channels: int = 1
    sustained: bool = False

    @property
    def label(self) -> str:
        if self.channels == 1:
            return f"{self.subscribers:,}"
        return f"{self.channels:,} ch x {self.subscribers // self.channels}"


def _find(results: Sequence[Result], system: str, case: str) -> Result | None:
    for result in results:
        if result["system"] == system and result["case"] == case:
            return result
    return None


def _phase(result: Result | None, name: str) -> Result | None:
    if result is None:
        return None
    phase = result.get("phases", {}).get(name)
    return phase if isinstance(phase, dict) else None


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else math.nan


def _fmt_rate(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value / 1000:,.1f}k"


def _fmt_ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _cases(results: Sequence[Result]) -> list[str]:
    seen: dict[str, None] = {}
    for result in results:
        seen.setdefault(result["case"], None)
    return list(seen)


def _systems(results: Sequence[Result]) -> list[str]:
    present = {r["system"] for r in results}
    return [s for name in SYSTEMS for s in (name + BASELINE_SUFFIX, name) if s in present]


def label(system: str) -> str:
    if system.endswith(BASELINE_SUFFIX):
        return f"{LABELS[system.removesuffix(BASELINE_SUFFIX)]}, baseline checkout"
    return LABELS[system]


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _incomplete(phase: Result | None) -> str:
    if phase is None or phase.get("complete"):
        return ""
    return f" ({phase['delivered']:,}/{phase['expected']:,})"


def _anchor_ratio(results: Sequence[Result], system: str, case: str, phase: str, key: str) -> str:
    """ " (1.23x)": this system's figure over the anchor's in the same case."""
    if system == ANCHOR:
        return ""
    mine = _phase(_find(results, system, case), phase)
    theirs = _phase(_find(results, ANCHOR, case), phase)
    if mine is None or theirs is None:
        return ""
    a, b = _num(mine[key]), _num(theirs[key])
    if math.isnan(a) or math.isnan(b) or b == 0:
        return ""
    return f" ({a / b:.2f}x)"


def burst_table(results: Sequence[Result]) -> str:
    cases = _cases(results)
    rows = []
    for system in _systems(results):
        cells = [label(system)]
        for case in cases:
            phase = _phase(_find(results, system, case), "burst")
            rate = _num(phase["deliveries_per_s"]) if phase else math.nan
            cells.append(
                _fmt_rate(rate)
                + _incomplete(phase)
                + _anchor_ratio(results, system, case, "burst", "deliveries_per_s")
            )
        rows.append(cells)
    return _table(["burst deliveries/s (x Go Centrifuge), subscribers:", *cases], rows)


def latency_table(results: Sequence[Result]) -> str:
    cases = _cases(results)
    rows = []
    for system in _systems(results):
        cells = [label(system)]
        for case in cases:
            phase = _phase(_find(results, system, case), "latency")
            if phase is None:
                cells.append("-")
                continue
            cells.append(
                f"{_fmt_ms(_num(phase['p50_ms']))} / {_fmt_ms(_num(phase['p99_ms']))}"
                + _incomplete(phase)
                + _anchor_ratio(results, system, case, "latency", "p99_ms")
            )
        rows.append(cells)
    return _table(["p50 / p99 ms (p99 x Go Centrifuge's), subscribers:", *cases], rows)


def keeps_up(phase: Result, rate: float) -> bool:
    """All delivered, publishing held its rate, and no backlog at the end (the last
    delivery within 500 ms of the last publication)."""
    return (
        bool(phase["complete"])
        and _num(phase["publish_rate"]) >= 0.95 * rate
        and _num(phase["drain_ms"]) <= 500
    )


def sustained_table(results: Sequence[Result], rate: float) -> str:
    rows = []
    for system in _systems(results):
        for result in results:
            phase = _phase(result, "sustained")
            if result["system"] != system or phase is None:
                continue
            rows.append(
                [
                    label(system),
                    f"{phase['delivered']:,}/{phase['expected']:,}",
                    _fmt_rate(_num(phase["deliveries_per_s"]))
                    + _anchor_ratio(
                        results, system, result["case"], "sustained", "deliveries_per_s"
                    ),
                    f"{_num(phase['publish_rate']):.0f}",
                    _fmt_ms(_num(phase["p50_ms"])),
                    _fmt_ms(_num(phase["p99_ms"]))
                    + _anchor_ratio(results, system, result["case"], "sustained", "p99_ms"),
                    _fmt_ms(_num(phase["max_ms"])),
                    _fmt_ms(_num(phase["drain_ms"])),
                    "yes" if keeps_up(phase, rate) else "**no**",
                ]
            )
    head = [
        "system",
        "delivered",
        "deliveries/s",
        "publications/s sent",
        "p50 ms",
        "p99 ms (x Go)",
        "max ms",
        "backlog at end ms",
        "keeps up",
    ]
    return _table(head, rows)


def memory_table(results: Sequence[Result]) -> str:
    cases = [c for c in _cases(results) if " ch " not in c]
    rows = []
    for system in _systems(results):
        cells = [label(system)]
        for case in cases:
            result = _find(results, system, case)
            if result is None or not result.get("connected"):
                cells.append("-")
                continue
            mark = "" if result.get("rss_settled") else " (unsettled)"
            kib = _num(result["per_connection_kib"])
            anchor = _find(results, ANCHOR, case)
            ratio = ""
            if system != ANCHOR and anchor is not None and _num(anchor["per_connection_kib"]) > 0:
                ratio = f" ({kib / _num(anchor['per_connection_kib']):.2f}x)"
            cells.append(f"{kib:.1f}{mark}{ratio}")
        rows.append(cells)
    return _table(["KiB per idle connection (x Go Centrifuge), N:", *cases], rows)


def cpu_table(results: Sequence[Result]) -> str:
    """Burst CPU: the load generator's against the server's (1.0 = one core busy)."""
    cases = _cases(results)
    rows = []
    for system in _systems(results):
        cells = [label(system)]
        for case in cases:
            phase = _phase(_find(results, system, case), "burst")
            if phase is None:
                cells.append("-")
                continue
            cells.append(
                f"{_num(phase['loadgen_cpu_share']):.2f} / {_num(phase['server_cpu_share']):.2f}"
            )
        rows.append(cells)
    return _table(["burst CPU, load generator / servers (cores):", *cases], rows)


def problems(results: Sequence[Result]) -> list[str]:
    out = []
    for result in results:
        where = f"{result['system']} @ {result['case']}"
        out += [f"{where}: {error}" for error in result.get("errors", [])]
        if result.get("dropped"):
            out.append(f"{where}: {result['dropped']} subscribers dropped by the server")
        for name, phase in result.get("phases", {}).items():
            if phase.get("publish_errors"):
                out.append(
                    f"{where} {name}: {phase['publish_errors']} publish errors, "
                    f"first: {phase.get('first_error', '')}"
                )
    return out


@dataclass(slots=True, frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def _ratio(results: Sequence[Result], a: str, b: str, phase: str, key: str) -> float:
    pa = _phase(_find(results, a, TARGET_CASE), phase)
    pb = _phase(_find(results, b, TARGET_CASE), phase)
    if pa is None or pb is None:
        return math.nan
    return _num(pa[key]) / _num(pb[key])


def _anchor_verdicts(results: Sequence[Result], sustain_rate: float) -> list[Verdict]:
    """The issue's targets, each a ratio to Go Centrifuge in the same run."""
    out = []
    for system in ("channel", "legacy"):
        ratio = _ratio(results, system, ANCHOR, "burst", "deliveries_per_s")
        out.append(
            Verdict(
                f"{system} burst >= 1.0x Go Centrifuge @ 1,000",
                "-" if math.isnan(ratio) else f"{ratio:.2f}x",
                None if math.isnan(ratio) else ratio >= 1.0,
            )
        )
        ratio = _ratio(results, system, ANCHOR, "latency", "p99_ms")
        out.append(
            Verdict(
                f"{system} p99 @ 1,000 x 20/s <= 1.25x Go Centrifuge's",
                "-" if math.isnan(ratio) else f"{ratio:.2f}x",
                None if math.isnan(ratio) else ratio <= 1.25,
            )
        )
        ratio = _ratio(results, system, ANCHOR, "sustained", "p99_ms")
        mine = _phase(_find(results, system, TARGET_CASE), "sustained")
        theirs = _phase(_find(results, ANCHOR, TARGET_CASE), "sustained")
        complete = bool(mine and mine.get("complete"))
        measured = "-" if math.isnan(ratio) else f"{ratio:.2f}x"
        held = True
        if mine is not None and theirs is not None:
            sent, anchor_sent = _num(mine["publish_rate"]), _num(theirs["publish_rate"])
            measured += f", {sent:.0f}/s sent (Go {anchor_sent:.0f}/s)"
            # A p99 at a lower rate than Go took is no comparison.
            held = sent >= 0.95 * min(sustain_rate, anchor_sent)
        if mine is not None and not complete:
            measured += f", {mine['delivered']:,}/{mine['expected']:,} delivered"
        out.append(
            Verdict(
                f"{system} p99 @ 1,000 x {sustain_rate:.0f}/s sustained <= 2x Go Centrifuge's, "
                "all delivered",
                measured,
                None if math.isnan(ratio) else ratio <= 2.0 and complete and held,
            )
        )
    return out


def verdicts(results: Sequence[Result], sustain_rate: float) -> list[Verdict]:
    out = _anchor_verdicts(results, sustain_rate)
    for target, a, b, floor in (
        ("channel burst >= 2x the websockets ceiling @ 1,000", "channel", "ws", 2.0),
        ("channel burst >= 10x python-socketio @ 1,000", "channel", "socketio", 10.0),
        ("legacy burst >= 0.7x the websockets ceiling @ 1,000", "legacy", "ws", 0.7),
    ):
        ratio = _ratio(results, a, b, "burst", "deliveries_per_s")
        met = None if math.isnan(ratio) else ratio >= floor
        out.append(Verdict(target, "-" if met is None else f"{ratio:.2f}x", met))
    ratio = _ratio(results, "channel", "ws", "latency", "p99_ms")
    out.append(
        Verdict(
            "channel p99 @ 1,000 x 20/s within 1.5x the ceiling's",
            "-" if math.isnan(ratio) else f"{ratio:.2f}x",
            None if math.isnan(ratio) else ratio <= 1.5,
        )
    )
    sustained = _phase(_find(results, "channel", TARGET_CASE), "sustained")
    out.append(
        Verdict(
            f"channel keeps up with 1,000 x {sustain_rate:.0f}/s sustained",
            "-"
            if sustained is None
            else f"{_num(sustained['publish_rate']):.0f}/s sent, "
            f"{_num(sustained['drain_ms']):.0f} ms backlog",
            None if sustained is None else keeps_up(sustained, sustain_rate),
        )
    )
    memory = [r for r in results if r["system"] == "channel" and " ch " not in r["case"]]
    if memory:
        largest = max(memory, key=lambda r: int(r["subscribers"]))
        kib = _num(largest["per_connection_kib"])
        out.append(
            Verdict(
                f"channel idle memory <= 20 KiB per connection (N={largest['case']})",
                f"{kib:.1f} KiB",
                kib <= 20,
            )
        )
    return out


def scaling_table(results: Sequence[Result], one: str = "redis1", two: str = "workers2") -> str:
    """`serve --workers 2` against one process, both over Redis, per case."""
    rows = []
    for case in _cases(results):
        a, b = _find(results, one, case), _find(results, two, case)
        if a is None or b is None:
            continue
        cells = [case]
        for name, key in (("burst", "deliveries_per_s"), ("sustained", "deliveries_per_s")):
            pa, pb = _phase(a, name), _phase(b, name)
            if pa is None or pb is None:
                cells.append("-")
                continue
            va, vb = _num(pa[key]), _num(pb[key])
            cells.append(f"{_fmt_rate(va)} / {_fmt_rate(vb)} ({vb / va:.2f}x)" if va else "-")
        pa, pb = _phase(a, "latency"), _phase(b, "latency")
        cells.append(
            f"{_fmt_ms(_num(pa['p99_ms']))} / {_fmt_ms(_num(pb['p99_ms']))}" if pa and pb else "-"
        )
        rows.append(cells)
    return _table(
        [
            "subscribers",
            "burst deliveries/s, 1 / 2 workers",
            "sustained deliveries/s, 1 / 2 workers",
            "p99 ms at 20/s, 1 / 2 workers",
        ],
        rows,
    )


def verdict_table(items: Sequence[Verdict]) -> str:
    marks = {True: "met", False: "**not met**", None: "not measured"}
    return _table(
        ["target", "this run", "verdict"], [[v.target, v.measured, marks[v.met]] for v in items]
    )


def chart(results: Sequence[Result], path: str, title: str) -> None:
    """Grouped bars of burst deliveries/s per system and case (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _cases(results)
    systems = _systems(results)
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    for i, system in enumerate(systems):
        values = []
        for case in cases:
            phase = _phase(_find(results, system, case), "burst")
            values.append(_num(phase["deliveries_per_s"]) if phase else 0.0)
        xs = [c + (i - (len(systems) - 1) / 2) * width for c in range(len(cases))]
        bars = ax.bar(xs, values, width, label=label(system))
        ax.bar_label(
            bars,
            labels=[f"{v / 1000:.0f}k" if v > 0 else "" for v in values],
            fontsize=7,
            padding=2,
        )
    ax.set_xticks(range(len(cases)), [f"{c} subscribers" for c in cases])
    ax.set_yscale("log")
    ax.set_ylabel("burst deliveries per second (log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
