"""The markdown report: one table per upstream delay, imagegw against the Python peer, memory, profile."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Plan, Step

__all__ = ["render_report"]

LABELS = {
    "fake": "(a) fake upstream",
    "envoy": "(b) plain Envoy = floor",
    "b64": "(c) imagegw b64_json",
    "url": "(d) imagegw url",
    "litellm": "(e) LiteLLM proxy, 2 workers",
}
IMAGE_LABELS = {"tiny": "tiny", "large": "1.5 MB"}
# The conditions issue 13 sets targets for, with the ratio to the Python peer it asks for
# (None: a target against the floor, not the peer), and the peer's figures measured
# earlier on this kind of machine (LiteLLM 1.108.7, req/s): (image, c, delay, ratio, earlier).
PEER_CONDITIONS = [
    ("tiny", 64, 0.0, 10, 219),
    ("large", 64, 0.0, 5, 74),
    ("tiny", 512, 1.0, None, 129),
    ("large", 512, 1.0, None, None),
]


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 100:
        return f"{ms:.1f}"
    return f"{ms:.0f}"


def _ratio(value: float | None, floor: float | None) -> str:
    if value is None or not floor:
        return "—"
    return f"{value / floor:.2f}"


def _mib(kib: int | None) -> str:
    return "—" if not kib else f"{kib / 1024:.0f}"


def _errors(step: Step) -> str:
    w = step.wrk
    if w is None:
        return "failed"
    if not w.errors:
        return "0"
    parts = [
        f"{name} {value}"
        for name, value in (
            ("non-2xx", w.errors_status),
            ("timeout", w.errors_timeout),
            ("read", w.errors_read),
            ("write", w.errors_write),
            ("connect", w.errors_connect),
        )
        if value
    ]
    return f"{w.errors} ({', '.join(parts)})"


def _same_condition(steps: list[Step], step: Step, target: str) -> Step | None:
    """``target``'s row with the same image, concurrency and delay as ``step``."""
    return _find(steps, target, step.image, step.concurrency, step.delay_s)


def _find(steps: list[Step], target: str, image: str, concurrency: int, delay: float) -> Step | None:
    for step in steps:
        if (step.target, step.image, step.concurrency, step.delay_s) == (
            target,
            image,
            concurrency,
            delay,
        ) and step.wrk:
            return step
    return None


def _lock(step: Step) -> str:
    busy, wait = step.lock_busy, step.lock_mean_wait_s
    if busy is None:
        return "—"
    # Per answer only in a steady state: an overloaded gateway admits more than it answers.
    acquired = step.lock_acquired or 0
    steady = step.estimator == "little" and step.completed > 0 and acquired > 0
    per = f", {step.lock_units / step.completed:.1f} txn in {acquired / step.completed:.2f} commits/answer" if steady else ""
    return f"{100 * min(busy, 1.0):.0f}% ({1000 * (wait or 0):.0f} ms{per})"


def _table(steps: list[Step]) -> list[str]:
    lines = [
        (
            "| image | c | target | req/s | ×floor | ×LiteLLM | p50 ms | p99 ms | errors | gateway CPU ms/req | ×floor | "
            "×LiteLLM | server peak RSS MiB | its Envoy peak RSS MiB | SQLite write lock busy (mean wait) | "
            "machine CPU busy |"
        ),
        "|---|--:|---|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for step in steps:
        floor = _same_condition(steps, step, "envoy")
        peer = _same_condition(steps, step, "litellm")
        busy = 100 * step.machine_busy_s / step.machine_total_s if step.machine_total_s else 0
        if step.wrk is None:
            lines.append(
                f"| {IMAGE_LABELS[step.image]} | {step.concurrency} | {LABELS[step.target]} | failed: "
                f"{(step.error or '').splitlines()[0][:80]} |||||||||||||"
            )
            continue
        cpu = step.cpu_ms_per_request
        if step.wrk.requests == 0:
            # Not one answer in the whole run: every request took longer than the run.
            run_s = step.wrk.duration_s
            rps, p50, p99 = "0", f"> {run_s * 1000:.0f}", f"> {run_s * 1000:.0f}"
        else:
            rps = f"{step.rps:.1f}" + {"little": "", "window": "†", "first-round": "‡"}[step.estimator]
            p50, p99 = _ms(step.wrk.p50_s), _ms(step.wrk.p99_s)
        cells = [
            IMAGE_LABELS[step.image],
            str(step.concurrency),
            LABELS[step.target],
            rps,
            _ratio(step.rps, floor.rps if floor else None),
            _ratio(step.rps, peer.rps if peer else None),
            p50,
            p99,
            _errors(step),
            "—" if cpu is None else f"{cpu:.2f}",
            _ratio(cpu, floor.cpu_ms_per_request if floor else None) if cpu is not None else "—",
            _ratio(cpu, peer.cpu_ms_per_request if peer else None) if cpu is not None else "—",
            _mib(step.server_peak_kib),
            _mib(step.envoy_peak_kib),
            _lock(step),
            f"{busy:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_report(
    steps: list[Step],
    *,
    plan: Plan,
    machine: dict[str, Any],
    sizes: dict[str, int],
    profile: dict[str, Any] | None,
    elapsed_s: float,
) -> str:
    out: list[str] = ["# imagegw benchmark", ""]
    out.append(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}, Envoy {machine['envoy']}. Load generator: {machine['wrk']} "
        f"(closed loop, one run per row: a warm-up of at least {plan.warmup_s:g} s that lasts until one answer per "
        f"connection has come back, at most {plan.max_warmup_s:g} s, then a {plan.measure_s:g} s measured window). "
        + " ".join(
            f"Image {IMAGE_LABELS[name]}: {size:,} B PNG ({4 * ((size + 2) // 3):,} B as base64)."
            for name, size in sizes.items()
        )
        + (
            f" Server RSS when idle (after start-up and one request per target): {machine['server_idle_rss_kib'] / 1024:.0f} MiB."
            if machine.get("server_idle_rss_kib")
            else ""
        )
        + f" Run took {elapsed_s:.0f} s."
    )
    out.append("")
    out.append(
        "req/s = concurrency / mean latency (Little's law: a closed loop keeps every connection busy), used when "
        "each connection completed at least 5 requests in the run; otherwise (marked †, an overloaded gateway) the "
        "successful answers completed inside the measured window / its length, counted by the target (the fake's "
        "own counter for row a, Envoy's `downstream_rq_2xx` for the others); ‡ = not even one answer per connection "
        "came back within the longest warm-up, so the window would only catch the tail of the first wave: "
        "concurrency / mean latency of the answers seen. All three are in results.json; wrk's own "
        "count/duration is not used: with a 1 s upstream the answers arrive in waves one second apart and a run's "
        "edges cut them. ×floor = this row / row (b) "
        "with the same image, concurrency and delay, from this run; ×LiteLLM = this row / row (e) likewise (for CPU, "
        "below 1 is less CPU per request than LiteLLM). p50/p99 = wrk's latency percentiles over the "
        "whole run (warm-up included). Errors = non-2xx answers plus socket errors and timeouts over the whole run. "
        "Gateway CPU = utime+stime of the imagegw server and its Envoy (row b: the floor Envoy; row e: every LiteLLM "
        "process, the two workers and their parent; row a: none) over the "
        "window, divided by req/s × window. Row e's answers in the window are counted by the fake (LiteLLM without a "
        "database keeps no count; only LiteLLM calls the fake in its row). SQLite write lock = the share of the window during which the server's "
        "SQLite writer held the write lock, the mean wait of a write transaction in the writer's queue, and write "
        "transactions and commits (group commit: one per batch) per answer (bench/instrument.py). "
        "Peak RSS = VmHWM over the whole row, warm-up included (reset at its start); row b: the floor Envoy; row e: the "
        "sum over LiteLLM's processes, in the server column. Machine CPU busy "
        "= the whole machine over the window, from /proc/stat: it includes the load generator, the fake and anything "
        "else running on this shared machine."
    )
    for delay in plan.delays:
        order = {name: i for i, name in enumerate(LABELS)}
        rows = sorted(
            (s for s in steps if s.delay_s == delay),
            key=lambda s: (
                list(IMAGE_LABELS).index(s.image),
                s.concurrency,
                order[s.target],
            ),
        )
        if not rows:
            continue
        out.append("")
        if delay > 0:
            out.append(f"## Upstream answers after {delay:g} s (the issue's condition)")
        else:
            out.append("## Upstream answers at once (0 s): throughput ceilings, not the issue's condition")
        out.append("")
        out += _table(rows)

    out.append("")
    out += _peer_table(steps)

    out.append("")
    out.append("## Memory (issue part 8)")
    out.append("")
    idle = machine.get("server_idle_rss_kib") or 0
    for target in ("b64", "url"):
        step = _find(steps, target, "large", 512, plan.delays[0])
        if step is not None and step.server_peak_kib:
            c64 = _find(steps, target, "large", 64, plan.delays[0])
            extra = ""
            if c64 is not None and c64.server_peak_kib and idle:
                extra = (
                    f" At c=64 the peak was {c64.server_peak_kib / 1024:.0f} MiB, i.e. "
                    f"{(c64.server_peak_kib - idle) / 1024 / 64:.1f} MiB per request in flight above the idle "
                    f"{idle / 1024:.0f} MiB."
                )
            out.append(
                f"- {LABELS[target]}: peak RSS of the server with 512 requests in flight on 1.5 MB images "
                f"(upstream {step.delay_s:g} s): **{step.server_peak_kib / 1024:.0f} MiB** "
                f"(its Envoy: {_mib(step.envoy_peak_kib)} MiB).{extra}"
            )
    peer = _find(steps, "litellm", "large", 512, plan.delays[0])
    if peer is not None and peer.server_peak_kib:
        out.append(
            f"- {LABELS['litellm']}: peak RSS of its processes together, same row: "
            f"**{peer.server_peak_kib / 1024:.0f} MiB**."
        )
    after = [s.server_rss_after_kib for s in steps if s.server_rss_after_kib]
    if after:
        out.append(
            f"- The server's RSS once idle again: {after[0] / 1024:.0f} MiB after the first row, "
            f"{max(after) / 1024:.0f} MiB at most, {after[-1] / 1024:.0f} MiB after the last row (freed memory the "
            "allocator keeps; per row in results.json as `server_rss_after_kib`)."
        )
    if profile and profile.get("samples"):
        out.append("")
        out += render_profile(profile)
    return "\n".join(out) + "\n"


def _rps(step: Step | None) -> str:
    return f"{step.rps:.0f}" if step is not None else "not run"


def _cpu(step: Step | None) -> str:
    cpu = step.cpu_ms_per_request if step is not None else None
    return "—" if cpu is None else f"{cpu:.1f}"


def _peer_table(steps: list[Step]) -> list[str]:
    """imagegw b64_json against LiteLLM at the conditions the issue sets targets for."""
    out = [
        "",
        "## Against the Python peer, same run",
        "",
        "req/s (gateway CPU ms per request). The issue's target is a ratio of req/s to LiteLLM in the same run; "
        "LiteLLM's figures measured earlier on this kind of machine are there for reference only.",
        "",
        "| condition | floor | LiteLLM, 2 workers | imagegw b64_json | b64 / LiteLLM | target | b64 / floor | "
        "LiteLLM measured earlier |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for image, concurrency, delay, target, earlier in PEER_CONDITIONS:
        floor = _find(steps, "envoy", image, concurrency, delay)
        peer = _find(steps, "litellm", image, concurrency, delay)
        b64 = _find(steps, "b64", image, concurrency, delay)
        out.append(
            f"| {IMAGE_LABELS[image]}, c={concurrency}, upstream {delay:g} s | {_rps(floor)} | "
            f"{_rps(peer)} ({_cpu(peer)}) | {_rps(b64)} ({_cpu(b64)}) | "
            f"{f'{b64.rps / peer.rps:.2f}×' if b64 and peer and peer.rps else '—'} | "
            f"{f'{target}×' if target else '—'} | {_ratio(b64.rps, floor.rps) if b64 and floor else '—'} | "
            f"{earlier or '—'} |"
        )
    return out


def render_profile(profile: dict[str, Any]) -> list[str]:
    step = profile.get("step", {})
    cpu_ms = step.get("cpu_ms_per_request")
    out = [
        (f"## Profile: the server under py-spy, 1.5 MB b64_json, c=64, upstream {step.get('delay_s', 1):g} s"),
        "",
        (
            f"{profile.get('cpu_s', 0):.2f} CPU s of the server process over a {profile.get('window_s', 0):.1f} s window "
            f"({step.get('rps', 0):.1f} req/s, {cpu_ms or 0:.1f} ms of server+Envoy CPU per request; py-spy pauses the "
            "server 100 times a second, so this run is slower than its table row and is not in the tables). "
            "Each thread's CPU time is exact (/proc/<pid>/task/*/stat); py-spy's samples "
            f"({profile.get('samples', 0)}, of which {profile.get('idle_samples', 0)} waiting and dropped) split "
            "it among stacks. Self time of a Python frame includes the C code it calls (sqlite3, zlib, Pillow, binascii)."
        ),
        "",
        "| server CPU by thread | CPU s | % |",
        "|---|--:|--:|",
    ]
    out += [f"| {name} | {sec:.2f} | {pct:.1f} |" for name, sec, pct in profile.get("threads", [])]
    out += [
        "",
        "| server CPU by what it was doing (first match on the stack) | CPU s | % |",
        "|---|--:|--:|",
    ]
    out += [f"| {name} | {sec:.2f} | {pct:.1f} |" for name, sec, pct in profile.get("categories", [])]
    out += ["", "| top functions, self | CPU s | % |", "|---|--:|--:|"]
    out += [f"| `{name}` | {sec:.2f} | {pct:.1f} |" for name, sec, pct in profile.get("self", [])]
    out += ["", "| top functions, inclusive | CPU s | % |", "|---|--:|--:|"]
    out += [f"| `{name}` | {sec:.2f} | {pct:.1f} |" for name, sec, pct in profile.get("inclusive", [])]
    files = profile.get("files")
    if files:
        out += [
            "",
            f"Raw stacks (collapsed, with line numbers): `{files[0]}`; flame graph (samples, idle included): `{files[1]}`.",
        ]
    return out
