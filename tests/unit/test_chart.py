"""The Helm chart, linted and rendered offline with Helm's Go SDK (helm-python-sdk; no helm binary, no cluster)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pilothouse.operator import crdgen
from pilothouse.serving.metrics import Metrics

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "pilothouse"
RELEASE, NAMESPACE = "ph", "pilothouse-system"
CRS = ("modeldeployments", "vectorindexes", "budgetpolicies", "autonomousworkflows")


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (templates only; Helm installs crds/ separately)."""
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples a list of RBAC rules allows."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def expected_namespaced() -> set[tuple[str, str, str]]:
    crud = ("get", "list", "watch", "create", "patch", "delete")
    want = {("pilothouse.io", cr, v) for cr in CRS for v in ("get", "list", "watch", "patch", "update")}
    want |= {("pilothouse.io", f"{cr}/status", v) for cr in CRS for v in ("get", "patch", "update")}
    want |= {(g, r, v) for g, r in (("ray.io", "rayservices"), ("", "configmaps"), ("", "services"),
                                    ("apps", "deployments")) for v in crud}
    want |= {("", "pods", v) for v in ("get", "list", "watch")} | {("", "secrets", "get")}
    want |= {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    return want


EXPECTED_CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")} | {
    ("", "namespaces", v) for v in ("list", "watch")}


def test_chart_lints_clean() -> None:
    for values in (None, {"watchNamespaces": ["team-a", "team-b"], "serviceMonitor": {"enabled": True}}):
        report = helm.lint(CHART, values, strict=True)
        assert report["errors"] == []
        # severity 1 (info, e.g. "icon is recommended") is fine; warnings and errors are not
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_schema_rejects_a_misspelt_value(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmValuesError, match="watchNamespace"):
        chart.render({"watchNamespace": ["team-a"]}, name=RELEASE)


def test_default_deployment_is_hardened(chart: helm.Chart) -> None:
    docs = render(chart)
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # kopf standalone: never two operators
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert "fsGroup" in pod["securityContext"]
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    c = container(docs)
    assert c["image"] == f"ghcr.io/pilothouse/pilothouse:{chart.metadata['appVersion']}"
    assert c["command"] == ["pilothouse"]
    assert c["args"][0] == "operator"
    assert "--namespace" not in c["args"]
    assert "--milvus-uri" not in c["args"]
    assert c["args"][c["args"].index("--liveness") + 1] == "http://0.0.0.0:8080/healthz"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": 8080}
    assert c["resources"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}
    tmp = next(m for m in c["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == tmp["name"])

    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "pilothouse"
    assert labels["app.kubernetes.io/instance"] == RELEASE
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert labels["app.kubernetes.io/part-of"] == "pilothouse"
    assert labels["app.kubernetes.io/version"] == chart.metadata["appVersion"]


def test_default_rbac_is_cluster_wide_least_privilege(chart: helm.Chart) -> None:
    docs = render(chart)
    sa = one(docs, "ServiceAccount")
    assert sa["metadata"]["namespace"] == NAMESPACE
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding", "ServiceMonitor")]

    role = one(docs, "ClusterRole")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[field]), rule
    granted = grants(role["rules"])
    assert granted == expected_namespaced() | EXPECTED_CLUSTER_SCOPED
    assert ("pilothouse.io", "modeldeployments/status", "patch") in granted
    assert ("", "secrets", "get") in granted
    assert not {("", "secrets", v) for v in ("list", "watch")} & granted
    assert ("ray.io", "rayservices", "create") in granted
    assert not {("pilothouse.io", cr, v) for cr in CRS for v in ("create", "delete")} & granted

    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]


def test_watch_namespaces_get_a_role_each(chart: helm.Chart) -> None:
    docs = render(chart, {"watchNamespaces": ["team-a", "team-b"]})
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"team-a", "team-b"}
    sa = one(docs, "ServiceAccount")["metadata"]["name"]
    for ns, role in roles.items():
        assert grants(role["rules"]) == expected_namespaced()
        assert bindings[ns]["roleRef"]["kind"] == "Role"
        assert bindings[ns]["roleRef"]["name"] == role["metadata"]["name"]
        assert bindings[ns]["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]
    # cluster scope keeps only the reads kopf needs
    assert grants(one(docs, "ClusterRole")["rules"]) == EXPECTED_CLUSTER_SCOPED
    assert one(docs, "ClusterRoleBinding")["subjects"][0]["name"] == sa

    args = " ".join(container(docs)["args"])
    assert "--namespace team-a --namespace team-b" in args


def test_milvus_and_store_url_flow_into_args(chart: helm.Chart) -> None:
    c = container(render(chart, {"milvus": {"uri": "http://milvus.db:19530"},
                                 "store": {"url": "postgresql+psycopg://ledger@pg/pilothouse"}}))
    args = c["args"]
    assert args[args.index("--milvus-uri") + 1] == "http://milvus.db:19530"
    assert args[args.index("--store-url") + 1] == "postgresql+psycopg://ledger@pg/pilothouse"
    assert "PILOTHOUSE_STORE_URL" not in {e["name"] for e in c.get("env", [])}


def test_default_store_lives_on_the_writable_tmp(chart: helm.Chart) -> None:
    args = container(render(chart))["args"]
    assert args[args.index("--store-url") + 1].startswith("sqlite:////tmp/")


def test_store_url_from_an_existing_secret(chart: helm.Chart) -> None:
    c = container(render(chart, {"store": {"existingSecret": "ledger-db", "existingSecretKey": "dsn"}}))
    assert "--store-url" not in c["args"]  # the CLI reads PILOTHOUSE_STORE_URL
    env = {e["name"]: e for e in c["env"]}
    assert env["PILOTHOUSE_STORE_URL"]["valueFrom"] == {"secretKeyRef": {"name": "ledger-db", "key": "dsn"}}


def test_store_url_and_secret_are_exclusive(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="not both"):
        render(chart, {"store": {"url": "sqlite:///x.db", "existingSecret": "ledger-db"}})


def test_service_monitor_selects_the_gateways(chart: helm.Chart) -> None:
    monitor = one(render(chart, {"serviceMonitor": {"enabled": True}}), "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "pilothouse-gateway"}
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_chart_crds_are_the_generated_ones(chart: helm.Chart) -> None:
    expected = {name: text.encode() for name, text in crdgen.render_all().items()}
    on_disk = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
    assert on_disk == expected, "charts/pilothouse/crds is stale: run `make crds`"
    # and Helm sees exactly those files as the chart's CRDs
    assert sorted(Path(c["filename"]).name for c in chart.crds) == sorted(expected)


# -- Grafana dashboard -----------------------------------------------------------------------------

DASHBOARD_PANELS = {"Spend vs budget", "Fallbacks by backend and reason", "Circuit state per backend",
                    "Request latency p50/p95/p99", "Gateway overhead p50/p99", "Cache hit rate (exact and semantic)",
                    "Requests by outcome", "RoutingTable revision"}
METRIC = re.compile(r"\bpilothouse_[A-Za-z0-9_]*")
SELECTOR = re.compile(r"\b(pilothouse_[A-Za-z0-9_]*)\{([^}]*)\}")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def exported() -> dict[str, set[str]]:
    """Sample name -> label names of every series the gateway's ``/metrics`` exposes, once each metric has data."""
    m = Metrics()
    m.allow(routes=["wf/step"], backends=["a", "b"], policies=["p"], workflows=["wf"])
    m.observe_request("wf/step", "a", "ok", 0.2, overhead_s=0.002)
    m.fallback("a", "b", "circuit_open")
    m.circuit("a", 2)
    m.spent("p", "a", 0.01)
    m.budget_left("p", "day", 9.99)
    m.cache("wf/step", hit=True)
    m.cache("wf/step", hit=False)
    m.semantic_lookup("wf/step", "hit", 0.004, similarity=0.97)
    m.semantic_store("wf/step", "stored")
    m.semantic_evicted("bound", 1)
    m.used_tokens("a", 10, 5)
    m.revision("wf", 3)
    m.run_finished("wf", "compensated", 1.5)
    m.run_cost("wf", 0.002)
    m.run_parked("wf")
    body, _ = m.render()
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("pilothouse_")
        # every metric the registry defines is listed (HELP/TYPE); each was exercised above, so has series
        assert family.samples, f"{family.name} not exercised"
        for sample in family.samples:
            if not sample.name.endswith("_created"):  # prometheus_client bookkeeping, not for dashboards
                samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def stem(sample: str) -> str:
    """The metric family a sample name belongs to (counters: _total; histograms: _bucket/_sum/_count)."""
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix):
            return sample.removesuffix(suffix)
    return sample


def dashboard(docs: list[dict[str, Any]]) -> dict[str, Any]:
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"].get("labels", {}).get("grafana_dashboard")]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert maps[0]["metadata"]["namespace"] == NAMESPACE
    return json.loads(maps[0]["data"]["pilothouse-gateway.json"])


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")]


def test_dashboard_configmap_is_the_file_on_disk(chart: helm.Chart) -> None:
    dash = dashboard(render(chart))
    assert dash == json.loads((CHART / "dashboards" / "pilothouse-gateway.json").read_text())
    assert dash["uid"] == "pilothouse-gateway"
    assert dash["schemaVersion"] >= 36
    assert {p["title"] for p in dash["panels"]} >= DASHBOARD_PANELS
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "label_values(pilothouse_table_revision, workflow)" in json.dumps(variables["workflow"]["query"])
    for panel in dash["panels"]:  # every panel and query reads the selected data source
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]


def test_dashboard_queries_only_metrics_the_gateway_exports(chart: helm.Chart) -> None:
    samples = exported()
    families = {stem(n) for n in samples}
    dash = dashboard(render(chart))
    queries = exprs(dash) + [json.dumps(v.get("query")) for v in dash["templating"]["list"]]
    used = {name for q in queries for name in METRIC.findall(q)}
    assert used >= {"pilothouse_spend_usd_total", "pilothouse_budget_remaining_usd", "pilothouse_fallbacks_total",
                    "pilothouse_circuit_state", "pilothouse_request_duration_seconds_bucket",
                    "pilothouse_gateway_overhead_seconds_bucket", "pilothouse_cache_hits_total",
                    "pilothouse_cache_misses_total", "pilothouse_requests_total", "pilothouse_table_revision"}
    for name in used:
        assert name in samples, f"dashboard queries {name}, which the gateway does not export"
        assert stem(name) in families
    for q in exprs(dash):
        names = set(METRIC.findall(q))
        if "histogram_quantile" in q:
            assert all(n.endswith("_bucket") for n in names), q
        for name, matchers in SELECTOR.findall(q):  # label matchers name labels the series carry
            for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
                assert label in samples[name], f"{name} has no label {label!r}: {q}"
        carried = set().union(*(samples[n] for n in names))
        for grouping in GROUPING.findall(q):  # and so does every `by (...)`
            for label in filter(None, (lbl.strip() for lbl in grouping.split(","))):
                assert label in carried, f"no queried metric has label {label!r}: {q}"


def test_dashboards_can_be_disabled(chart: helm.Chart) -> None:
    assert not [d for d in render(chart, {"dashboards": {"enabled": False}}) if d["kind"] == "ConfigMap"]


def test_dashboard_and_service_monitor_render_together(chart: helm.Chart) -> None:
    docs = render(chart, {"serviceMonitor": {"enabled": True}, "dashboards": {"labels": {"grafana_folder": "ai"}}})
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["path"] == "/metrics"
    cm = one(docs, "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_folder"] == "ai"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
