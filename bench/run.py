"""Fan-out benchmark: the shim beside python-socketio and a bare `websockets` broadcast,
all measured by one Go load generator in one run, on 127.0.0.1 only.

    .venv/bin/python bench/run.py            # full run, about 10 minutes
    .venv/bin/python bench/run.py --quick    # smoke, about two minutes
    .venv/bin/python bench/run.py --docs     # also rewrite docs/benchmarks.{md,png}
    .venv/bin/python bench/run.py --profile  # also py-spy the shim under a 1,000 burst

Writes results.json, results.md and benchmarks.png to --out (default bench/out).
See bench/README.md for what each phase measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.report import Case  # noqa: E402
from bench.servers import Keys, Running, go_env, make_keys, running  # noqa: E402

LOADGEN_DIR = ROOT / "bench" / "loadgen"
DOCS_MD = ROOT / "docs" / "benchmarks.md"
DOCS_PNG = ROOT / "docs" / "benchmarks.png"
START_MARK = "<!-- results:start -->"
END_MARK = "<!-- results:end -->"


@dataclass(slots=True, frozen=True)
class Plan:
    cases: tuple[Case, ...]
    burst_deliveries: int
    rate: float
    rate_seconds: float
    sustain_rate: float
    sustain_seconds: float
    settle_seconds: float
    phase_timeout: float


FULL = Plan(
    cases=(Case(100), Case(1000, sustained=True), Case(5000), Case(5000, channels=1000)),
    burst_deliveries=100_000,
    rate=20,
    rate_seconds=5,
    sustain_rate=200,
    sustain_seconds=10,
    settle_seconds=10,
    phase_timeout=60,
)
QUICK = Plan(
    cases=(Case(100), Case(300, sustained=True), Case(100, channels=20)),
    burst_deliveries=10_000,
    rate=20,
    rate_seconds=1,
    sustain_rate=200,
    sustain_seconds=1,
    settle_seconds=2,
    phase_timeout=15,
)


def build_loadgen(out: Path) -> Path:
    """`go build` against Debian's gorilla/websocket (go.mod replaces it with
    /usr/share/gocode), with no module proxy: it works offline or not at all."""
    # Built outside the tree: a 7 MB binary has no place in a commit.
    binary = Path(tempfile.gettempdir()) / "dex-bench-loadgen"
    env = go_env(
        GOFLAGS="-mod=mod",
        GOPATH=os.environ.get("GOPATH", str(Path(tempfile.gettempdir()) / "dex-bench-gopath")),
    )
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=LOADGEN_DIR, env=env, check=True)
    return binary


def loadgen_args(binary: Path, system: str, case: Case, plan: Plan, target: Running) -> list[str]:
    sustained = case.sustained
    system = system.removesuffix(report.BASELINE_SUFFIX)
    return [
        str(binary),
        f"-system={'channel' if system.startswith(('redis', 'workers', 'delay')) else system}",
        f"-sub-urls={','.join(target.sub_urls)}",
        f"-pub-url={target.pub_url}",
        f"-api-key={target.api_key}",
        f"-subs={case.subscribers}",
        f"-channels={case.channels}",
        f"-server-pids={','.join(map(str, target.server_pids))}",
        f"-extra-cpu-pids={','.join(map(str, target.extra_cpu_pids))}",
        f"-burst-deliveries={plan.burst_deliveries}",
        f"-rate={plan.rate}",
        f"-rate-seconds={plan.rate_seconds}",
        f"-sustain-rate={plan.sustain_rate if sustained else 0}",
        f"-sustain-seconds={plan.sustain_seconds if sustained else 0}",
        f"-settle-timeout={plan.settle_seconds}",
        f"-phase-timeout={plan.phase_timeout}",
    ]


def run_one(
    binary: Path,
    system: str,
    case: Case,
    plan: Plan,
    keys: Keys,
    tokens: Path,
    workdir: Path,
    baseline: Path | None = None,
) -> dict[str, Any]:
    with running(system, keys, workdir, baseline) as target:
        args = [*loadgen_args(binary, system, case, plan, target), f"-tokens={tokens}"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["system"] = system
    result["case"] = case.label
    return result


def progress(result: dict[str, Any]) -> str:
    parts = [f"{result['system']:>13} @ {result['case']:<17} load {result.get('loadavg', 0):4.1f}"]
    parts.append(f"mem {result.get('per_connection_kib', 0):5.1f} KiB")
    for name in ("latency", "sustained", "burst"):
        phase = result.get("phases", {}).get(name)
        if phase:
            parts.append(
                f"{name} {phase['deliveries_per_s'] / 1000:7.1f}k/s "
                f"p99 {phase['p99_ms']:7.1f}ms {phase['delivered']}/{phase['expected']}"
            )
    if result.get("errors"):
        parts.append(f"errors: {result['errors']}")
    return "  ".join(parts)


def profile_burst(
    binary: Path, plan: Plan, keys: Keys, tokens: Path, workdir: Path, case: Case
) -> str:
    """py-spy samples the channel-protocol server during a burst; returns the top
    functions by own and by inclusive samples."""
    raw = workdir / f"profile-{case.subscribers}-{case.channels}.txt"
    only_burst = Plan(**{**_plan_dict(plan), "rate_seconds": 0, "burst_deliveries": 200_000})
    with running("channel", keys, workdir) as target:
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "--rate",
                "200",
                "--output",
                str(raw),
                "--pid",
                str(target.server_pids[0]),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        args = [*loadgen_args(binary, "channel", case, only_burst, target), f"-tokens={tokens}"]
        subprocess.run(args, capture_output=True, text=True, timeout=600, check=False)
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    return summarize_profile(raw.read_text() if raw.exists() else "")


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in Plan.__slots__}


_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+):\d+\)$")


def summarize_profile(collapsed: str, top: int = 25) -> str:
    """Own and inclusive sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        names = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame.strip())
            if match:
                path = match.group("file")
                short = "/".join(Path(path).parts[-2:])
                names.append(f"{match.group('func')} ({short})")
            else:
                names.append(frame.strip())
        if names:
            own[names[-1]] = own.get(names[-1], 0) + count
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + count
    if not total:
        return "(no samples)"

    def rows(table: dict[str, int]) -> list[str]:
        ordered = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [f"| {name} | {100 * n / total:.1f}% |" for name, n in ordered]

    return "\n".join(
        [
            f"{total} samples",
            "",
            "| own time | share |",
            "|---|---:|",
            *rows(own),
            "",
            "| inclusive time | share |",
            "|---|---:|",
            *rows(inclusive),
        ]
    )


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    go = subprocess.run(["go", "version"], capture_output=True, text=True, check=False).stdout
    versions = {
        name: metadata.version(name)
        for name in ("python-socketio", "uvicorn", "websockets", "hypercorn", "uvloop")
    }
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "go": go.strip(),
        "versions": versions,
        "loadavg_start": os.getloadavg(),
    }


def markdown(info: dict[str, Any], results: Sequence[dict[str, Any]], plan: Plan) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        f"Command: `{info['command']}` ({info['date']}, {info['seconds']:.0f} s).",
        "",
        f"Machine: {info['cores']} cores ({info['cpu']}) shared by every server, Redis and "
        f"the load generator; Python {info['python']}, {info['go']}; {versions}. "
        f"Load average {info['loadavg_start'][0]:.1f} at the start, "
        f"{info['loadavg_end'][0]:.1f} at the end (other work on the machine shows here).",
        "",
        "### Burst deliveries/s",
        "",
        report.burst_table(results),
        "",
        f"### Latency at a fixed rate ({plan.rate:.0f} publications/s for "
        f"{plan.rate_seconds:.0f} s)",
        "",
        report.latency_table(results),
        "",
        f"### Sustained: {plan.sustain_rate:.0f} publications/s for {plan.sustain_seconds:.0f} s",
        "",
        report.sustained_table(results, plan.sustain_rate),
        "",
        "### Memory per idle connection",
        "",
        report.memory_table(results),
        "",
        "### CPU during the burst",
        "",
        report.cpu_table(results),
        "",
        "### One process against `serve --workers 2` (both over Redis)",
        "",
        report.scaling_table(results),
        "",
        "### Targets",
        "",
        report.verdict_table(report.verdicts(results, plan.sustain_rate)),
    ]
    issues = report.problems(results)
    if issues:
        lines += ["", "### Problems seen", ""] + [f"- {p}" for p in issues]
    if info.get("profile"):
        lines += ["", "### Shim hot spots (py-spy, channel protocol, during a burst)", ""]
        lines.append(info["profile"])
    return "\n".join(lines) + "\n"


def write_docs(text: str, png: Path) -> None:
    DOCS_PNG.write_bytes(png.read_bytes())
    doc = DOCS_MD.read_text()
    start, end = doc.index(START_MARK) + len(START_MARK), doc.index(END_MARK)
    DOCS_MD.write_text(doc[:start] + "\n" + text + doc[end:])


def measure(
    plan: Plan,
    systems: Sequence[str],
    out: Path,
    argv: Sequence[str] | None,
    *,
    baseline: Path | None = None,
    rounds: int = 1,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Every case x system, systems side by side per case so machine noise hits
    them alike; returns (run info, results) and saves them to out/results.json.
    With `baseline`, each shim system also runs from that checkout, just before
    this one's; with `rounds` > 1 the systems of a case take turns that many times
    and each round is a case of its own ("<case> #2"), ratios within the round."""
    if baseline is not None:
        systems = [
            variant
            for system in systems
            for variant in (
                (system + report.BASELINE_SUFFIX, system)
                if system in report.SHIM_SYSTEMS
                else (system,)
            )
        ]
    started = time.monotonic()
    info = machine()
    info["command"] = " ".join(["python", "bench/run.py", *(argv or sys.argv[1:])])
    info["date"] = time.strftime("%Y-%m-%d %H:%M")
    binary = build_loadgen(out)
    keys = make_keys(max(c.subscribers for c in plan.cases) + 10)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dex-bench-") as tmp:
        workdir = Path(tmp)
        tokens = workdir / "tokens.txt"
        tokens.write_text("\n".join(keys.tokens) + "\n")
        for case in plan.cases:
            for round_ in range(1, rounds + 1):
                for system in systems:
                    try:
                        result = run_one(
                            binary, system, case, plan, keys, tokens, workdir, baseline
                        )
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        print(f"{system} @ {case.label}: {exc}", file=sys.stderr)
                        continue
                    if rounds > 1:
                        result["case"] = f"{case.label} #{round_}"
                    result["loadavg"] = os.getloadavg()[0]
                    results.append(result)
                    print(progress(result), file=sys.stderr, flush=True)
    info["seconds"] = time.monotonic() - started
    info["loadavg_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    return info, results


def profile(plan: Plan, out: Path) -> str:
    binary = build_loadgen(out)
    keys = make_keys(5010)
    sections = []
    with tempfile.TemporaryDirectory(prefix="dex-bench-") as tmp:
        workdir = Path(tmp)
        tokens = workdir / "tokens.txt"
        tokens.write_text("\n".join(keys.tokens) + "\n")
        for case in (Case(1000), Case(5000, channels=1000)):
            summary = profile_burst(binary, plan, keys, tokens, workdir, case)
            sections.append(f"Burst at {case.label} subscribers: {summary}")
    return "\n\n".join(sections)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a short smoke run (about two minutes)"
    )
    parser.add_argument("--systems", default=",".join(report.SYSTEMS), help="comma-separated")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument("--docs", action="store_true", help="rewrite docs/benchmarks.{md,png}")
    parser.add_argument("--profile", action="store_true", help="py-spy the shim's bursts")
    parser.add_argument("--from-json", help="render a saved results.json instead of measuring")
    parser.add_argument(
        "--cases",
        help="only these of the plan's cases, by label (e.g. '1,000' or '1,000 ch x 5'), "
        "separated by ';': quicker side-by-side runs while working on one of them",
    )
    parser.add_argument(
        "--baseline",
        help="another checkout (e.g. a worktree of main): each shim system also runs "
        "its code, with this venv, just before this checkout's ('<system>@base')",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each case's systems this many times in turn (a column per round)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.cases:
        wanted = {label.strip() for label in args.cases.split(";")}
        plan = Plan(
            **{**_plan_dict(plan), "cases": tuple(c for c in plan.cases if c.label in wanted)}
        )
    # SIGTERM unwinds like Ctrl-C, so every server this run started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    systems = [s for s in args.systems.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        info, results = saved["info"], saved["results"]
    else:
        baseline = Path(args.baseline).resolve() if args.baseline else None
        if baseline is not None and not (baseline / "shim" / "app" / "cli.py").exists():
            parser.error(f"--baseline {args.baseline}: not a checkout of this project")
        info, results = measure(
            plan, systems, out, argv, baseline=baseline, rounds=max(1, args.rounds)
        )
    if args.profile:
        info["profile"] = profile(plan, out)
    text = markdown(info, results, plan)
    (out / "results.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    (out / "results.md").write_text(text)
    png = out / "benchmarks.png"
    report.chart(results, str(png), f"Fan-out burst, one run on {info['cores']} shared cores")
    if args.docs:
        write_docs(text, png)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
