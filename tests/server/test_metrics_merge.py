"""`metrics.merge`: several processes' expositions as one node's, read back by
prometheus_client's own parser."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ssehub.gateway.metrics import GatewayMetrics
from ssehub.server import Hub
from ssehub.server.metrics import (
    MAX_GAUGES,
    SUMMED_GAUGES,
    make_registry,
    merge,
    node_exposition,
    render,
    render_families,
)

Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def values(text: str) -> Values:
    """Every sample of an exposition, by name and labels, as the parser reads it."""
    found: Values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"{key} twice"
            found[key] = sample.value
    return found


def merged(*expositions: str) -> str:
    return render_families(merge(expositions)).decode()


def declared(text: str) -> list[str]:
    """The `# TYPE` lines' names, in order."""
    return [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]


def process(
    completions: dict[tuple[str, str], int],
    first_tokens: list[tuple[str, float]],
    active: int,
    version: int = 1,
) -> str:
    """A process's exposition: a labelled counter, a labelled histogram and gauges."""
    registry = CollectorRegistry()
    counter = Counter("app_completions", "Completions.", ["backend", "outcome"], registry=registry)
    for labels, n in completions.items():
        counter.labels(*labels).inc(n)
    histogram = Histogram(
        "app_first_token_seconds", "TTFT.", ["backend"], buckets=(0.1, 1), registry=registry
    )
    for backend, seconds in first_tokens:
        histogram.labels(backend).observe(seconds)
    Gauge("ssehub_connections", "Open connections.", registry=registry).set(active)
    Gauge("app_version", "A per-process reading.", registry=registry).set(version)
    return generate_latest(registry).decode()


def test_counters_add_up_per_label_set() -> None:
    one = process({("demo", "finished"): 2, ("demo", "failed"): 1}, [], 0)
    two = process({("demo", "finished"): 5, ("upstream", "finished"): 7}, [], 0)
    got = values(merged(one, two))
    assert got["app_completions_total", (("backend", "demo"), ("outcome", "finished"))] == 7
    assert got["app_completions_total", (("backend", "demo"), ("outcome", "failed"))] == 1
    assert got["app_completions_total", (("backend", "upstream"), ("outcome", "finished"))] == 7


def test_histograms_add_up_per_bucket_count_and_sum() -> None:
    one = process({}, [("demo", 0.05), ("demo", 0.5)], 0)
    two = process({}, [("demo", 0.5), ("demo", 3.0), ("upstream", 0.05)], 0)
    got = values(merged(one, two))
    name = "app_first_token_seconds"
    demo = (("backend", "demo"),)
    assert got[f"{name}_bucket", (*demo, ("le", "0.1"))] == 1
    assert got[f"{name}_bucket", (*demo, ("le", "1.0"))] == 3
    assert got[f"{name}_bucket", (*demo, ("le", "+Inf"))] == 4
    assert got[f"{name}_count", demo] == 4
    assert got[f"{name}_sum", demo] == 0.05 + 0.5 + 0.5 + 3.0
    upstream = (("backend", "upstream"),)
    assert got[f"{name}_bucket", (*upstream, ("le", "0.1"))] == 1
    assert got[f"{name}_count", upstream] == 1


def test_gauges_sum_or_keep_the_highest_and_created_keeps_the_earliest() -> None:
    one = process({("demo", "finished"): 1}, [], active=3, version=1)
    two = process({("demo", "finished"): 1}, [], active=4, version=2)
    got = values(merged(one, two))
    assert got["ssehub_connections", ()] == 7
    assert got["app_version", ()] == 2
    created = "app_completions_created", (("backend", "demo"), ("outcome", "finished"))
    assert got[created] == min(values(one)[created], values(two)[created])


def test_the_merge_is_valid_exposition_each_family_declared_once() -> None:
    one = process({("demo", "finished"): 1}, [("demo", 0.2)], 1)
    two = process({("upstream", "failed"): 1}, [("upstream", 0.2)], 2)
    text = merged(one, two, one)
    assert declared(text) == declared(one)
    assert len(set(declared(text))) == len(declared(text))
    assert text.count("# HELP app_completions_total ") == 1
    # Each label set's samples stay together, buckets in order, as the format asks.
    buckets = [line for line in text.splitlines() if line.startswith("app_first_token")]
    assert [b.split("{")[0] for b in buckets[:5]] == [
        "app_first_token_seconds_bucket",
        "app_first_token_seconds_bucket",
        "app_first_token_seconds_bucket",
        "app_first_token_seconds_count",
        "app_first_token_seconds_sum",
    ]
    assert values(text)["app_completions_total", (("backend", "demo"), ("outcome", "finished"))]


def test_hand_written_expositions() -> None:
    one = (
        "# HELP jobs_total Jobs.\n# TYPE jobs_total counter\n"
        'jobs_total{queue="a"} 1\njobs_total{queue="b b"} 2.5\n'
        "# HELP ssehub_channels Channels.\n# TYPE ssehub_channels gauge\nssehub_channels 2\n"
        "# HELP temperature A reading.\n# TYPE temperature gauge\ntemperature 20\n"
    )
    two = (
        "# HELP ssehub_channels Channels.\n# TYPE ssehub_channels gauge\nssehub_channels 5\n"
        "# HELP jobs_total Jobs.\n# TYPE jobs_total counter\n"
        'jobs_total{queue="a"} 10\n'
        "# HELP temperature A reading.\n# TYPE temperature gauge\ntemperature 18\n"
        "# HELP only_here_total Only in two.\n# TYPE only_here_total counter\nonly_here_total 3\n"
    )
    text = merged(one, two)
    assert values(text) == {
        ("jobs_total", (("queue", "a"),)): 11,
        ("jobs_total", (("queue", "b b"),)): 2.5,
        ("ssehub_channels", ()): 7,
        ("temperature", ()): 20,
        ("only_here_total", ()): 3,
    }
    assert declared(text) == ["jobs_total", "ssehub_channels", "temperature", "only_here_total"]


def test_a_family_of_another_type_elsewhere_is_left_out_there() -> None:
    one = "# HELP x X.\n# TYPE x gauge\nx 1\n"
    two = "# HELP x_total X.\n# TYPE x_total counter\nx_total 5\n"
    assert values(merged(one, two)) == {("x", ()): 1}


def real_registry() -> tuple[CollectorRegistry, GatewayMetrics]:
    registry = make_registry(Hub())
    return registry, GatewayMetrics(registry)


def test_one_process_merged_alone_is_unchanged() -> None:
    registry, gateway = real_registry()
    gateway.tokens.labels("demo").inc(12)
    gateway.time_to_first_token.labels("demo").observe(0.3)
    gateway.completions.labels("demo", "finished").inc()
    gateway.active.set(1)
    own = render(registry).decode()
    assert merged(own) == own


def test_two_processes_of_the_real_registry() -> None:
    (reg_one, one), (reg_two, two) = real_registry(), real_registry()
    one.completions.labels("demo", "finished").inc(2)
    two.completions.labels("demo", "finished").inc(3)
    one.active.set(1)
    two.active.set(2)
    text = node_exposition(render(reg_one), [render(reg_two).decode()], unanswered=1).decode()
    got = values(text)
    assert got["ssehub_gateway_completions_total", (("backend", "demo"), ("outcome", "finished"))]
    assert got["ssehub_gateway_active_streams", ()] == 3
    assert got["ssehub_connections", ()] == 0
    assert got["ssehub_metrics_processes", ()] == 2
    assert got["ssehub_metrics_processes_unanswered", ()] == 1
    assert declared(text) == [*declared(render(reg_one).decode()), *PROCESS_GAUGES]


PROCESS_GAUGES = ["ssehub_metrics_processes", "ssehub_metrics_processes_unanswered"]


def test_alone_the_exposition_is_the_process_own_plus_two_gauges() -> None:
    registry, _ = real_registry()
    own = render(registry)
    text = node_exposition(own, [], unanswered=0)
    assert text.startswith(own)
    extra = values(text[len(own) :].decode())
    assert extra == {
        ("ssehub_metrics_processes", ()): 1,
        ("ssehub_metrics_processes_unanswered", ()): 0,
    }


def test_every_gauge_ssehub_has_is_decided() -> None:
    registry, gateway = real_registry()
    gateway.tokens.labels("demo").inc()  # a `_created` gauge family too
    gauges = {
        family.name
        for family in text_string_to_metric_families(render(registry).decode())
        if family.type == "gauge" and not family.name.endswith("_created")
    }
    assert gauges == SUMMED_GAUGES | MAX_GAUGES
    assert not SUMMED_GAUGES & MAX_GAUGES
