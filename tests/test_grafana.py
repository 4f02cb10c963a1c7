"""deploy/grafana/braid.json: the dashboard is what build.py makes, well formed, and names only live metrics.

Structure: unique panel ids, every panel inside the 24-column grid and none overlapping, every
target on the ``${datasource}`` variable, every variable it uses defined (and every one defined
used), every PromQL expression parses (promql-parser, Prometheus's grammar) and filters on the
job and instance variables.

Live: a real standalone server and a real local cluster (one shard server, one router, NATS),
each with ``--metrics-port``, get a little traffic (create, upsert, search by vector and by text
through the ONNX encoder, a SPANN seal, a flush, refused calls, a search while the shard server is
down) so the labelled series exist; every process's /metrics is scraped once. Then every metric
an expression names must have series on every role its panel names (the description's
``Exported by:``; a variable's: every role, collections: the servers holding them); every label it
matches, groups by or puts in a legend must be one those series carry; and a metric with a
``collection`` label must be filtered by the collection variable.
``test_the_check_catches_a_wrong_dashboard`` feeds the same check a dashboard with a typo'd metric,
a grouping label and a legend label no series has, a missing collection filter and a panel claiming
the wrong role, and expects each reported.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import socket
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import print_logs

from .conftest import random_vectors, schema, start_in_process, stop_in_process, wait_for

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "deploy" / "grafana" / "build.py"
DASHBOARD = ROOT / "deploy" / "grafana" / "braid.json"
ROLES = ("standalone", "router", "shard")
COLUMNS = 24
# Labels Prometheus adds at scrape time (and the ad hoc filters' own), never in /metrics.
TARGET_LABELS = {"job", "instance"}
# Grafana's interval variables, replaced by a duration before parsing.
INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
DIM = 8
# Where each variable's values come from: every role, but collections only from the servers holding them.
VARIABLE_ROLES = {"collection": {"standalone", "shard"}}


def load_build() -> Any:
    spec = importlib.util.spec_from_file_location("grafana_build", BUILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# ------------------------------------------------------------------ dashboard walking


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with a collapsed row's own panels."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def roles_of(panel: dict[str, Any]) -> set[str]:
    found = re.search(r"Exported by: ([a-z, ]+)\.$", panel.get("description", ""))
    assert found, f"panel {panel['title']!r}: its description must end with 'Exported by: <roles>.'"
    return {role.strip() for role in found.group(1).split(",")}


def promql(expr: str) -> Any:
    """Parse a dashboard expression: Grafana's interval variables become a duration first
    (other variables only appear inside label matcher strings)."""
    return promql_parser.parse(INTERVALS.sub("5m", expr))


@dataclass
class Selector:
    metric: str
    labels: dict[str, str]  # label name -> value (matcher operators are not needed here)


def selectors(node: Any) -> list[Selector]:
    found: list[Selector] = []

    def visit(n: Any) -> None:
        if isinstance(n, promql_parser.VectorSelector):
            labels = {m.name: m.value for m in n.matchers.matchers}
            name = n.name or labels.get("__name__")
            assert name, f"a selector without a metric name: {n}"
            found.append(Selector(name, labels))

    promql_parser.walk(node, visit)
    return found


def label_values_query(query: str) -> tuple[str, str]:
    """``label_values(<selector>, <label>)`` -> (selector, label)."""
    found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert found, f"not a label_values query: {query!r}"
    return found.group(1), found.group(2)


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, expr) of every PromQL expression: targets and the variables' label_values selectors."""
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", label_values_query(variable["query"])[0]


# ------------------------------------------------------------------ what servers export


@dataclass
class Exported:
    """One role's /metrics: each series name with the label names its samples carry."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    roles: set[str] = field(default_factory=set)  # braid_build_info's role label (the role variable's values)

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.labels.setdefault(sample.name, set()).update(sample.labels)
                if sample.name == "braid_build_info":
                    self.roles.add(sample.labels["role"])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def labels_of(metric: str, exported: dict[str, Exported]) -> set[str] | None:
    """Label names of the metric's series on any role (with the target labels); None: no series anywhere."""
    seen = [one.labels[metric] for one in exported.values() if metric in one.labels]
    return set().union(*seen) | TARGET_LABELS if seen else None


def output_labels(node: Any, exported: dict[str, Exported]) -> set[str] | None:
    """Labels an expression's result carries (None for a scalar or an unknown metric): what a legend can show."""
    if isinstance(node, promql_parser.VectorSelector):
        return labels_of(selectors(node)[0].metric, exported)
    if isinstance(node, promql_parser.MatrixSelector):
        return output_labels(node.vector_selector, exported)
    if isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        return output_labels(node.expr, exported)
    if isinstance(node, promql_parser.AggregateExpr):
        inner = output_labels(node.expr, exported)
        modifier = node.modifier
        if modifier is None:
            return set()
        if modifier.type == promql_parser.AggModifierType.By:
            return set(modifier.labels)
        return None if inner is None else inner - set(modifier.labels)
    if isinstance(node, promql_parser.Call):
        vectors = [output_labels(arg, exported) for arg in node.args]
        known = [labels for labels in vectors if labels is not None]
        if not known:
            return None
        out = set().union(*known)
        return out - {"le"} if node.func.name == "histogram_quantile" else out
    if isinstance(node, promql_parser.BinaryExpr):
        left, right = output_labels(node.lhs, exported), output_labels(node.rhs, exported)
        return left if left is not None else right
    return None


def problems(dashboard: dict[str, Any], exported: dict[str, Exported]) -> list[str]:
    """Everything the dashboard names that the scraped servers do not export, or not on the panel's roles."""
    out: list[str] = []

    def check_expr(where: str, expr: str, roles: set[str], legend: str = "") -> None:
        node = promql(expr)
        for selector in selectors(node):
            metric = selector.metric
            known = labels_of(metric, exported)
            for role in sorted(roles):
                if metric not in exported[role].labels:
                    out.append(f"{where}: {metric} has no series on the {role} role")
            if known is not None:
                for label in sorted(set(selector.labels) - known - {"__name__"}):
                    out.append(f"{where}: {metric} has no label {label!r}")
                filtered = selector.labels.get("collection") == "$collection"
                if "collection" in known and not filtered and not where.startswith("variable collection"):
                    out.append(f'{where}: {metric} has a collection label but no collection=~"$collection"')

        def grouping(n: Any) -> None:
            if isinstance(n, promql_parser.AggregateExpr) and n.modifier is not None:
                inner = [labels_of(one.metric, exported) for one in selectors(n.expr)]
                have = set().union(*[labels for labels in inner if labels is not None])
                for label in sorted(set(n.modifier.labels) - have):
                    out.append(f"{where}: no metric under {n.op} by/without has label {label!r}")

        promql_parser.walk(node, grouping)
        shown = output_labels(node, exported)
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if shown is not None and label not in shown:
                out.append(f"{where}: legend {{{{{label}}}}} is not a label of the result ({sorted(shown)})")

    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            where = f"panel {panel['title']!r} target {target['refId']}"
            check_expr(where, target["expr"], roles_of(panel), target.get("legendFormat", ""))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query, label = label_values_query(variable["query"])
            where = f"variable {variable['name']}"
            check_expr(where, query, VARIABLE_ROLES.get(variable["name"], set(ROLES)))
            for selector in selectors(promql(query)):
                known = labels_of(selector.metric, exported)
                if known is not None and label not in known:
                    out.append(f"{where}: {selector.metric} has no label {label!r}")
    return out


# ------------------------------------------------------------------ structure (no server)


def test_braid_json_is_what_build_py_makes() -> None:
    build = load_build()
    assert DASHBOARD.read_text() == build.dumps(build.render()), "run: python deploy/grafana/build.py"


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36 and dashboard["uid"] and dashboard["title"]  # Grafana 9.x/10+ model
    panels = list(all_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"

    # Inside the grid, and no two panels of the expanded layout overlap.
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= COLUMNS, f"{panel['title']!r} runs past column {COLUMNS}"
    for panel in dashboard["panels"]:  # top level: what Grafana lays out as it is
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
    for row in dashboard["panels"]:
        if row["type"] == "row":
            assert row["panels"] == [] or row["collapsed"], f"row {row['title']!r}: only a collapsed row nests panels"

    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    for variable in variables.values():
        if variable["type"] in ("query", "adhoc"):
            assert variable["datasource"] == source, variable["name"]

    used: set[str] = set()
    for panel in graph_panels(dashboard):
        assert panel["datasource"] == source, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        assert roles_of(panel) <= set(ROLES), panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == source, f"{panel['title']!r} {target['refId']}"
    for where, expr in expressions(dashboard):
        node = promql(expr)  # raises on a syntax error
        for name in VARIABLE.findall(INTERVALS.sub("", expr)):
            used.add(name[0] or name[1])
        for selector in selectors(node):
            assert selector.labels.get("job") == "$job" or where == "variable job", f"{where}: no job filter"
            if where not in ("variable job", "variable role", "variable instance"):
                assert selector.labels.get("instance") == "$instance", f"{where}: no instance filter"
    undefined = used - set(variables)
    assert not undefined, f"undefined variables: {sorted(undefined)}"
    unused = set(variables) - used - {"datasource", "filters"}  # those two apply without being named
    assert not unused, f"variables no query uses: {sorted(unused)}"


# ------------------------------------------------------------------ live servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vector_docs(n: int, seed: int = 0) -> list[dict[str, Any]]:
    vectors = random_vectors(n, DIM, seed)
    return [
        {"id": f"d{i}", "text": {"title": f"title {i}", "body": "common words"}, "dense": {"emb": vectors[i]}}
        for i in range(n)
    ]


def encoded_schema() -> pb.Schema:
    encoder = pb.Encoder(model="all-minilm-l6-v2", source_fields=["body"])
    return pb.Schema(
        text_fields=[pb.TextField(name="body")],
        dense_fields=[pb.DenseVectorField(name="emb", metric=pb.COSINE, encoder=encoder)],
    )


def has_series(port: int, name: str) -> bool:
    exported = Exported()
    exported.add(scrape(port))
    return name in exported.labels


def traffic(client: BraidClient, storage_port: int) -> None:
    """Collections with each kind of dense index and vector source, writes, searches, a SPANN seal
    (waited for on ``storage_port``: the server holding the shards), a flush and refused calls."""
    client.create_collection("docs", schema(dim=DIM, payload={"lang": pb.KEYWORD}), shards=2)
    client.upsert("docs", vector_docs(40))
    client.search("docs", dense=("emb", random_vectors(1, DIM, 9)[0]), bm25="common", limit=3)
    client.create_collection("notes", encoded_schema())
    client.upsert("notes", [{"id": f"n{i}", "text": {"body": f"note number {i}"}} for i in range(4)])
    client.search("notes", dense=("emb", "a question"), limit=2)
    spann = pb.SpannParams(merge_threshold=200, target_list_size=16)
    field_ = pb.DenseVectorField(name="v", dim=DIM, metric=pb.COSINE, index="spann", spann=spann)
    client.create_collection("s", pb.Schema(dense_fields=[field_]))
    vectors = random_vectors(300, DIM, 3)
    client.upsert("s", [{"id": f"s{i}", "dense": {"v": v}} for i, v in enumerate(vectors)])
    wait_for(lambda: has_series(storage_port, "braid_merge_duration_seconds_count"), 120, "a SPANN seal")
    client.search("s", dense=("v", vectors[0]), limit=3)
    client.flush("docs")
    bad = pb.SearchRequest(collection="docs", queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb"))])
    bad.queries[0].dense.vector.packed = np.zeros(DIM - 1, "<f4").tobytes()  # the wrong dimension
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Search(bad, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        client.get_collection("missing")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def standalone_metrics(directory: Path, models_dir: Path) -> Exported:
    port = free_port()
    server, running = start_in_process(directory, metrics_port=port, models_dir=models_dir)
    try:
        traffic(running.client, port)
        exported = Exported()
        exported.add(scrape(port))
        return exported
    finally:
        stop_in_process(server, running)


def cluster_metrics(directory: Path, models_dir: Path) -> tuple[Exported, Exported]:
    """(shard server, router) after the traffic; the router's after a search that found the shard
    server gone (so its retry counter has a series)."""
    shard_port, router_port = free_port(), free_port()
    cluster = LocalCluster(
        directory,
        shard_servers=1,
        routers=1,
        shard_args=["--metrics-port", str(shard_port)],
        router_args=["--metrics-port", str(router_port), "--models-dir", str(models_dir)],
    )
    try:
        with BraidClient(cluster.router_address, timeout=60) as client:
            traffic(client, shard_port)
            wait_for(lambda: has_series(shard_port, "braid_replica_lag_records"), 60, "replica lag")
            shard = Exported()
            shard.add(scrape(shard_port))
            cluster.shards[0].kill()  # its heartbeat lives on for the TTL: the router tries it and counts
            with pytest.raises(grpc.RpcError) as info:
                client.search("docs", dense=("emb", random_vectors(1, DIM, 9)[0]), limit=3, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            router = Exported()
            router.add(scrape(router_port))
            return shard, router
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> dict[str, Exported]:
    directory = tmp_path_factory.mktemp("grafana")
    standalone = standalone_metrics(directory / "standalone", models_dir)
    shard, router = cluster_metrics(directory / "cluster", models_dir)
    return {"standalone": standalone, "router": router, "shard": shard}


def test_every_expression_names_exported_metrics(exported: dict[str, Exported]) -> None:
    found = problems(load_dashboard(), exported)
    assert not found, "\n".join(found)
    # The roles really differ: what a panel says about roles is checked against something.
    assert "braid_router_failovers_total" in exported["router"].labels
    assert "braid_router_failovers_total" not in exported["shard"].labels
    assert "braid_replica_lag_records" not in exported["router"].labels
    # Each process names its own role (the dashboard's role variable picks instances by it), and a
    # router, which stores nothing, has no disk to report.
    assert {role: one.roles for role, one in exported.items()} == {role: {role} for role in exported}
    assert "braid_disk_free_bytes" not in exported["router"].labels
    assert "braid_disk_free_bytes" in exported["shard"].labels
    assert "braid_collection_documents" not in exported["router"].labels


def test_the_check_catches_a_wrong_dashboard(exported: dict[str, Exported]) -> None:
    dashboard = load_dashboard()
    broken = copy.deepcopy(dashboard)
    panels = {panel["title"]: panel for panel in graph_panels(broken)}
    rows = panels["HNSW rows by part"]["targets"][0]
    rows["expr"] = rows["expr"].replace("braid_hnsw_rows{", "braid_hnsw_row{")  # a typo
    memory = panels["Index memory"]["targets"][0]
    memory["expr"] = memory["expr"].replace("by (collection, field, index)", "by (collection, field, kind)")
    memory["legendFormat"] = "{{collection}}/{{field}} {{kind}}"
    panels["Disk free"]["targets"][0]["legendFormat"] = "{{pod}}"
    documents = panels["Live documents by collection"]["targets"][0]
    documents["expr"] = documents["expr"].replace(',collection=~"$collection"', "")
    lag = panels["Replica lag"]
    lag["description"] = lag["description"].replace("Exported by: shard.", "Exported by: router, shard.")
    found = "\n".join(problems(broken, exported))
    assert "'HNSW rows by part' target A: braid_hnsw_row has no series on the shard role" in found
    assert "'Index memory' target A: no metric under sum by/without has label 'kind'" in found
    assert "'Disk free' target A: legend {{pod}} is not a label of the result (['instance'])" in found
    assert "'Live documents by collection' target A: braid_collection_documents has a collection label" in found
    assert "'Replica lag' target A: braid_replica_lag_records has no series on the router role" in found
