"""
The Grafana dashboard (contrib/grafana-dashboard.json) against what
``GET /metrics`` really exposes: every metric name and label its PromQL
uses is in a real exposition (produced in memory and read back through
prometheus_client's own parser), the cluster-wide gauges are aggregated
with max(), and every panel has a title.
"""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from memory import Harness
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import signaling.metrics
from signaling.metrics import Counts, Histogram, ServerMetrics, SignalingCollector

pytestmark = pytest.mark.memory  # (it builds an exposition over in-memory connections)

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana-dashboard.json"

#: the metric names the dashboard may use are the ones starting with these
PREFIXES = ("signaling_", "process_", "python_")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
#: labels Prometheus adds to every series it scrapes
SCRAPE_LABELS = frozenset({"instance", "job"})
#: the registry's (with --redis, the cluster's) gauges: the same on every node, so max() across instances
CLUSTER_WIDE = frozenset({"signaling_users", "signaling_pairs", "signaling_users_offline"})
#: the families only a node with --redis exposes (not in a memory-mode exposition)
CLUSTER_ONLY = frozenset({"signaling_redis_up", "signaling_redis_seconds"})


# -- a small regex-based PromQL reader ---------------------------------------------------------------------
#
# Enough for the dashboard's queries, not a PromQL parser.  What it does: blanks string literals (keeping
# their length, so positions in the original stay valid); finds metric names as identifiers starting with
# PREFIXES, each with the label matchers of a `{...}` right after it; finds aggregations (`sum`, `max`...)
# with their `by`/`without` grouping written before or after the parenthesised argument, matched by counting
# parentheses; and reads Grafana's `label_values(selector, label)`.
# Its limits: a bare `{__name__="..."}` selector, metric names not starting with PREFIXES, and the labels of
# `on(...)`/`ignoring(...)`/`group_left(...)` vector matching, `label_replace`/`label_join` are not seen; a
# grouping label is checked against every selector inside the aggregation, not against what the inner
# expressions leave (a `by (state)` over a `max by (instance)` would pass); Grafana variables other than in
# strings or `[$__rate_interval]`-style ranges are not expected.

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_IDENTIFIER = re.compile(r"(?<![a-zA-Z0-9_:])[a-zA-Z_:][a-zA-Z0-9_:]*")
_AGGREGATION = re.compile(
    r"(?<![a-zA-Z0-9_:])(sum|min|max|avg|group|stddev|stdvar|count|count_values|bottomk|topk|quantile|limitk"
    r"|limit_ratio)\s*(?:(by|without)\s*\(([^()]*)\)\s*)?\("
)
_GROUPING_AFTER = re.compile(r"\s*(by|without)\s*\(([^()]*)\)")
_BRACES = re.compile(r"\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*(\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*')")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\(\s*(?:(.*\S)\s*,\s*)?([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", re.S)


def _blank(expr):
    """``expr`` with every string literal's content replaced by spaces (the quotes and the length kept)."""
    return _STRING.sub(lambda m: m.group()[0] + " " * (len(m.group()) - 2) + m.group()[-1], expr)


def _closing(text, opening):
    """The index of the parenthesis closing the one at ``opening``."""
    depth = 0
    for i in range(opening, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError(f"unbalanced parentheses: {text!r}")


def _labels(group):
    return {name.strip() for name in group.split(",") if name.strip()}


def read_promql(expr):
    """
    The selectors of ``expr``: a list of dicts with ``name`` (the metric name as written), ``matchers``
    ({label: (operator, quoted value)}), ``grouping`` (the labels of the enclosing aggregations' by/without)
    and ``aggregations`` (the enclosing aggregation operators, innermost first).
    """
    text = _blank(expr)
    aggregations = []
    for m in _AGGREGATION.finditer(text):
        start = m.end() - 1
        end = _closing(text, start)
        grouping = _labels(m.group(3)) if m.group(2) else set()
        after = _GROUPING_AFTER.match(text, end + 1)
        if after:
            grouping |= _labels(after.group(2))
        aggregations.append((start, end, m.group(1), grouping))
    selectors = []
    for m in _IDENTIFIER.finditer(text):
        name = m.group()
        if not name.startswith(PREFIXES):
            continue
        if text.rfind("{", 0, m.start()) > text.rfind("}", 0, m.start()):
            continue  # a label name inside a matcher
        if re.match(r"\s*\(", text[m.end():]):
            continue  # a function
        matchers = {}
        braces = _BRACES.match(text, m.end())
        if braces:
            for label, op, value in _MATCHER.findall(expr[braces.start(1):braces.end(1)]):
                matchers[label] = (op, value)
        enclosing = sorted((a for a in aggregations if a[0] < m.start() < a[1]), key=lambda a: -a[0])
        selectors.append({
            "name": name,
            "matchers": matchers,
            "grouping": set().union(*(a[3] for a in enclosing)),
            "aggregations": [a[2] for a in enclosing],
        })
    return selectors


def read_query(query):
    """:func:`read_promql`, also for Grafana's ``label_values([selector,] label)`` (its label as grouping)."""
    m = _LABEL_VALUES.match(query)
    if not m:
        return read_promql(query)
    selectors = read_promql(m.group(1) or "")
    for selector in selectors:
        selector["grouping"] = selector["grouping"] | {m.group(2)}
    return selectors


# -- the dashboard ------------------------------------------------------------------------------------------


def load_dashboard():
    with DASHBOARD.open(encoding="utf-8") as f:
        return json.load(f)


def all_panels(dashboard):
    """Every panel, rows' nested panels (collapsed rows hold theirs) included."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def panel_queries(dashboard):
    """``(panel title, expr)`` for every target of every panel."""
    return [(panel.get("title"), target["expr"])
            for panel in all_panels(dashboard) for target in panel.get("targets", []) if "expr" in target]


def template_queries(dashboard):
    """``(variable name, query)`` for every query variable (its query a string or Grafana's query object)."""
    out = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        out.append((variable["name"], query.get("query", "") if isinstance(query, dict) else query))
    return out


def all_selectors(dashboard):
    """``(where, expr, selector)`` for every selector of every panel target and query variable."""
    return [(where, expr, s)
            for where, expr in panel_queries(dashboard) + template_queries(dashboard)
            for s in read_query(expr)]


# -- what the server exposes --------------------------------------------------------------------------------


def memory_exposition():
    """A memory-mode server's /metrics: two paired peers, and a refusal of each kind (for the status label)."""
    h = Harness()
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    metrics = ServerMetrics(h.factory, h.registry, h.clock)
    h.factory.metrics.handshake_refusals[403] += 1
    metrics.site = SimpleNamespace(counts=SimpleNamespace(total=1), refusals={429: 1})
    assert metrics.refresh().called
    return metrics.exposition().decode("utf-8")


def cluster_exposition():
    """The server's collector as a --redis node runs it (a stand-in for the cluster registry)."""
    cluster = SimpleNamespace(ready=True, expired=0, latency=Histogram())
    cluster.latency.observe(0.0003)
    collector = SignalingCollector(Counts(), lambda: {"native": 1}, lambda: (0, {}), lambda: None,
                                   cluster=cluster, node="node-1")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode("utf-8")


class Exposed:
    """The families of expositions: sample names, their labels, and each family's type."""

    def __init__(self, *texts):
        self.types = {}  # family name (as the parser names it) -> type
        self.samples = {}  # sample name -> its label names
        self.family_of = {}  # sample name -> family name
        for text in texts:
            for family in text_string_to_metric_families(text):
                self.types[family.name] = family.type
                for sample in family.samples:
                    self.samples.setdefault(sample.name, set()).update(sample.labels)
                    self.family_of[sample.name] = family.name

    def family(self, name):
        """The family of a metric name as written: histogram suffixes stripped only where the base is one."""
        for suffix in HISTOGRAM_SUFFIXES:
            base = name[: -len(suffix)]
            if name.endswith(suffix) and self.types.get(base) == "histogram":
                return base
        return self.family_of.get(name, name)


@pytest.fixture(scope="module")
def memory_text():
    return memory_exposition()


@pytest.fixture(scope="module")
def exposed(memory_text):
    return Exposed(memory_text, cluster_exposition())


@pytest.fixture(scope="module")
def dashboard():
    return load_dashboard()


# -- the reader itself --------------------------------------------------------------------------------------


def test_the_reader_reads_selectors_groupings_and_aggregations():
    (s,) = read_promql('sum(rate(signaling_relays_total{instance=~"$instance", job!="x"}[1m])) by (type)')
    assert s["name"] == "signaling_relays_total"
    assert s["matchers"] == {"instance": ("=~", '"$instance"'), "job": ("!=", '"x"')}
    assert s["grouping"] == {"type"} and s["aggregations"] == ["sum"]
    (s,) = read_promql("sum(max by (state) (signaling_users))")
    assert s["grouping"] == {"state"} and s["aggregations"] == ["max", "sum"]
    (s,) = read_promql("histogram_quantile(0.99, sum by (instance, le) (rate(signaling_redis_seconds_bucket[5m])))")
    assert s["name"] == "signaling_redis_seconds_bucket" and s["grouping"] == {"instance", "le"}
    # names in strings are not selectors; label names in matchers are not either
    assert [s["name"] for s in read_promql('up{job="signaling_x", signaling_y="1"} + process_open_fds')] == [
        "process_open_fds"]
    (s,) = read_query("label_values(signaling_info{registry=\"redis\"}, instance)")
    assert s["name"] == "signaling_info" and s["grouping"] == {"instance"}
    assert read_query("label_values(instance)") == []


def test_the_exposition_has_every_family(memory_text, exposed):
    """The expositions the checks stand on: the cluster-only families come from a --redis collector only."""
    memory = Exposed(memory_text)
    for name in CLUSTER_ONLY:
        assert name not in memory.types
        assert name in exposed.types
        assert f'"{name}"' in Path(signaling.metrics.__file__).read_text(encoding="utf-8")
    assert exposed.types["signaling_relay_seconds"] == "histogram"
    assert exposed.types["signaling_redis_seconds"] == "histogram"
    assert exposed.samples["signaling_handshake_refusals_total"] == {"status"}
    assert exposed.samples["signaling_http_refusals_total"] == {"status"}
    assert "process_cpu_seconds_total" in exposed.samples


# -- the dashboard's checks ---------------------------------------------------------------------------------


def test_it_is_an_importable_dashboard(dashboard):
    assert isinstance(dashboard.get("title"), str) and dashboard["title"].strip()
    assert isinstance(dashboard.get("panels"), list) and dashboard["panels"]
    assert isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    inputs = {i.get("name") for i in dashboard.get("__inputs", [])}
    datasource = variables.get("datasource")
    assert "DS_PROMETHEUS" in inputs or (
        datasource is not None and datasource["type"] == "datasource" and datasource["query"] == "prometheus")
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["multi"] is True
    assert dict(template_queries(dashboard))["instance"].replace(" ", "") == "label_values(signaling_info,instance)"
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["type"] in {"row", "timeseries", "stat"}, panel["title"]
        x, w = panel["gridPos"]["x"], panel["gridPos"]["w"]
        assert 0 <= x and x + w <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets") and all(t.get("expr", "").strip() for t in panel["targets"]), panel["title"]
            assert panel["datasource"]["uid"] in {"${datasource}", "${DS_PROMETHEUS}"}, panel["title"]


def test_every_panel_has_a_title_and_a_description(dashboard):
    for panel in all_panels(dashboard):
        assert isinstance(panel.get("title"), str) and panel["title"].strip(), panel
        if panel["type"] != "row":
            assert isinstance(panel.get("description"), str) and panel["description"].strip(), panel["title"]


def test_every_metric_name_is_exposed(dashboard, exposed):
    selectors = all_selectors(dashboard)
    assert selectors
    unknown = {(where, s["name"]) for where, _, s in selectors if s["name"] not in exposed.samples}
    assert not unknown, f"not exposed by the server: {sorted(unknown)}"


def test_every_label_is_one_the_family_has(dashboard, exposed):
    wrong = []
    for where, expr, s in all_selectors(dashboard):
        known = exposed.samples.get(s["name"], set()) | SCRAPE_LABELS
        used = set(s["matchers"]) | s["grouping"]
        if used - known:
            wrong.append((where, expr, sorted(used - known)))
    assert not wrong, f"labels the family does not have: {wrong}"


def test_every_panel_filters_on_the_instance_variable(dashboard):
    for title, expr in panel_queries(dashboard):
        for s in read_promql(expr):
            assert s["matchers"].get("instance") == ("=~", '"$instance"'), (title, expr)


def test_cluster_wide_gauges_are_aggregated_with_max(dashboard, exposed):
    """Users, pairs and users in grace are the same on every node: never summed across instances."""
    for where, expr, s in all_selectors(dashboard):
        if exposed.family(s["name"]) in CLUSTER_WIDE:
            assert s["aggregations"], f"{where}: {expr}: one series per instance, aggregate with max()"
            assert s["aggregations"][0] == "max", f"{where}: {expr}: {s['aggregations'][0]}() across instances"


def test_every_signaling_family_is_charted(dashboard, exposed):
    """A family the server exposes and no panel shows is a gap in the dashboard (or a family to remove)."""
    used = {exposed.family(s["name"]) for _, _, s in all_selectors(dashboard)}
    missing = {name for name in {exposed.family(n) for n in exposed.samples}
               if name.startswith("signaling_") and name not in used}
    assert not missing, f"exposed but on no panel: {sorted(missing)}"
