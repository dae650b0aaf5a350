"""The performance targets apipool-proxy must meet, judged from one benchmark run.

Each verdict is (passed, line). A target whose section ran but could not measure apipool-proxy
fails: an unmeasured target is not a met one. Sections that were not run give no verdict.
"""

RPS_FLOOR = 0.90  # apipool req/s at 32 connections, as a share of the reference proxy's
P50_CEILING = 1.15  # apipool p50 at 1 connection, as a multiple of the reference proxy's
STREAM_DELAY_P99_MS = 5.0  # per-chunk delay the proxy adds, p99
STREAM_RSS_MB = 200.0
LEAK_GROWTH_PCT = 10.0


def verdict(passed: bool, text: str) -> tuple[bool, str]:
    return passed, f"{'PASS' if passed else 'FAIL'}  {text}"


def nonstream_verdicts(section: dict) -> list[tuple[bool, str]]:
    levels = {level["connections"]: level["targets"] for level in section["levels"]}
    if section.get("apipool_error"):
        why = "not measured: apipool-proxy unavailable"
        return [
            verdict(False, f"req/s at 32 connections ({why})"),
            verdict(False, f"p50 at 1 connection ({why})"),
        ]
    return [rps_verdict(levels.get(32)), p50_verdict(levels.get(1))]


def rps_verdict(figures: dict | None) -> tuple[bool, str]:
    if not figures:
        return verdict(False, "req/s at 32 connections: level not run")
    apipool, reference = figures["apipool"], figures["reference"]
    share = apipool["rps"] / reference["rps"]
    text = (
        f"req/s at 32 connections: {share:.2f}x reference "
        f"({apipool['rps']:,.0f} vs {reference['rps']:,.0f}; target >= {RPS_FLOOR:.2f}x)"
    )
    return error_aware(share >= RPS_FLOOR, text, apipool["errors"])


def p50_verdict(figures: dict | None) -> tuple[bool, str]:
    if not figures:
        return verdict(False, "p50 at 1 connection: level not run")
    apipool, reference = figures["apipool"], figures["reference"]
    multiple = apipool["p50_ms"] / reference["p50_ms"]
    text = (
        f"p50 at 1 connection: {multiple:.2f}x reference "
        f"({apipool['p50_ms']:.3f} vs {reference['p50_ms']:.3f} ms; "
        f"target <= {P50_CEILING:.2f}x)"
    )
    return error_aware(multiple <= P50_CEILING, text, apipool["errors"])


def error_aware(passed: bool, text: str, errors: int) -> tuple[bool, str]:
    # Fast error answers would flatter the figures, so any error fails the target.
    if errors:
        return verdict(False, f"{text}; {errors} failed requests")
    return verdict(passed, text)


def stream_verdicts(section: dict) -> list[tuple[bool, str]]:
    streams = section["streams"]
    if section.get("apipool_error"):
        why = "not measured: apipool-proxy unavailable"
        return [verdict(False, f"{streams:,} concurrent streams ({why})")]
    light, full = section["loads"][0], section["loads"][-1]  # the full load runs last
    apipool = full["paths"]["apipool"]
    return [
        verdict(
            apipool["errors"] == 0,
            f"{streams:,} concurrent streams without errors: {apipool['errors']} errors "
            f"{apipool['error_kinds'] or ''}".rstrip(),
        ),
        delay_verdict(full, light),
        verdict(
            apipool["peak_rss_mb"] < STREAM_RSS_MB,
            f"peak RSS at {streams:,} streams: {apipool['peak_rss_mb']:.1f} MB "
            f"(target < {STREAM_RSS_MB:g} MB)",
        ),
    ]


def added_p99(load: dict, name: str) -> float | None:
    """p99 delay of a path minus that of the direct path: what the proxy adds."""
    mine, direct = (
        load["paths"][name]["delay_ms"]["p99"],
        load["paths"]["direct"]["delay_ms"]["p99"],
    )
    return None if mine is None or direct is None else mine - direct


def delay_verdict(full: dict, light: dict) -> tuple[bool, str]:
    """Judge the delay apipool adds over the measuring setup alone (the direct path)."""
    what = f"added delay per chunk p99 at {full['streams']:,} streams"
    added = added_p99(full, "apipool")
    if added is None:
        return verdict(False, f"{what}: not measured, no chunk arrived")
    reference, at_light = added_p99(full, "reference"), added_p99(light, "apipool")
    floor = added_p99(full, "floor") if "floor" in full["paths"] else None
    text = (
        f"{what}: {added:.2f} ms (nginx pass-through adds {fmt_ms(floor)}, reference proxy "
        f"{fmt_ms(reference)}; at {light['streams']:,} streams apipool adds {fmt_ms(at_light)}; "
        f"target < {STREAM_DELAY_P99_MS:g} ms)"
    )
    direct = full["paths"]["direct"]
    # If the client and upstream alone cannot deliver the offered rate, every path ran at a
    # lower rate than specified: the figures still show, but cannot confirm the target.
    sent, offered = direct["achieved_chunks_per_s"] or 0, direct["offered_chunks_per_s"]
    if sent < 0.9 * offered:
        text += (
            f"; the load side alone sent only {sent:,} of {offered:,} chunks/s here, "
            "so a pass cannot be confirmed on this machine"
        )
        return verdict(False, text)
    passed = added < STREAM_DELAY_P99_MS
    if not passed and floor is not None and floor >= STREAM_DELAY_P99_MS:
        # A proxy in C doing nothing but relay misses the target too: the machine's
        # loopback costs, not the proxy, set the delay, and the target cannot be judged here.
        text += "; nginx misses it too, so this machine cannot judge the target"
    return verdict(passed, text)


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def leak_verdicts(section: dict) -> list[tuple[bool, str]]:
    if section.get("apipool_error"):
        return [verdict(False, "memory growth (not measured: apipool-proxy unavailable)")]
    first, last = section["checkpoints"][0], section["checkpoints"][-1]
    growth = section["growth_pct"]
    text = (
        f"RSS after {last['requests']:,} requests within {LEAK_GROWTH_PCT:g}% of RSS after "
        f"{first['requests']:,}: {first['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB "
        f"({growth:+.1f}%)"
    )
    if last["requests"] < section["target_requests"]:
        return [verdict(False, f"{text}; stopped short of {section['target_requests']:,}")]
    return [verdict(abs(growth) <= LEAK_GROWTH_PCT, text)]


def all_verdicts(results: dict) -> list[tuple[bool, str]]:
    judges = {"nonstream": nonstream_verdicts, "stream": stream_verdicts, "leak": leak_verdicts}
    verdicts = []
    for name, judge in judges.items():
        section = results["sections"].get(name)
        if section and not section.get("error"):
            verdicts += judge(section)
        elif section:
            verdicts.append(verdict(False, f"{name} section failed: {section['error']}"))
    return verdicts
