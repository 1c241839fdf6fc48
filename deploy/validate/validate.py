"""Validate everything under deploy/ offline; called by scripts/validate-deploy.

1. Renders every kustomization under deploy/ with kustomize_lite, and refuses
   YAML files that no kustomization (or the short list of standalone files)
   accounts for.
2. Validates every rendered object against the Kubernetes JSON schemas bundled
   by kubernetes-validate, strictly (unknown fields fail), for each Kubernetes
   version asked for; the custom resources (KEDA, Prometheus Operator) against
   the strict schemas in deploy/validate/schemas/.
3. Checks the invariants Weft's deployment depends on and that no generic
   linter knows: drain deadline below the termination grace period, worker
   namespace wiring, probes on the right ports, the autoscalers using the one
   depth query, PodMonitor ports, metric names known to docs/operations.md, ...
4. Parses every PromQL expression (alerts, dashboard, adapter rule).
5. Writes the "installed" view (the example overlay plus the autoscaling and
   monitoring kustomizations in its namespace, as docs/operations.md applies
   them) and the Dockerfile to OUT/install for checkov.

Exit status 1 when anything failed; every failure is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import sys
from typing import Any

import jsonschema
import promql_parser
import yaml
from kubernetes_validate import utils as kv
from referencing import Registry, Resource

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kustomize_lite  # noqa: E402

# THE depth query. docs/operations.md ("The depth query") is its place of
# record; the KEDA ScaledObjects must carry exactly this text, and this
# validator checks that the doc still shows it.
DEPTH_QUERY = "select depth + in_flight from weft.queue_stats() where queue_name = 'weft_steps_{ns}'"

# YAML files under the validated trees that are not Kubernetes resources of a
# kustomization, and how they are checked instead.
STANDALONE_OBJECTS = {"deploy/k8s/base/secret.example.yaml"}
ADAPTER_RULES = "deploy/k8s/autoscaling/hpa/prometheus-adapter-rules.yaml"
NOT_RESOURCES = {ADAPTER_RULES}
RESOURCE_TREES = ("deploy/k8s", "deploy/prometheus")

# The overlay whose rendering is "the installation" for checkov and the
# cross-object checks; the other kustomizations are applied into its namespace.
INSTALL_OVERLAY = "deploy/k8s/overlays/example"
APPLIED_INTO_INSTALL = ("deploy/k8s/autoscaling/keda", "deploy/k8s/autoscaling/hpa", "deploy/prometheus")

CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.yaml",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda.sh-v1alpha1.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring.coreos.com-v1.yaml",
}

IMAGE_REPO = "ghcr.io/weft/weft"
RUN_AS = 10001


class Report:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.section = ""

    def start(self, section: str) -> None:
        self.section = section
        print(f"--- {section}", flush=True)

    def fail(self, message: str) -> None:
        self.failures.append(f"[{self.section}] {message}")
        print(f"FAIL {message}", flush=True)

    def ok(self, message: str) -> None:
        print(f"ok   {message}", flush=True)

    def check(self, condition: bool, message: str) -> bool:
        if not condition:
            self.fail(message)
        return condition


def rel(root: str, path: str) -> str:
    return os.path.relpath(path, root)


def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind')} {ns}{meta.get('name')}"


# --- 1. rendering -----------------------------------------------------------


def find_kustomizations(root: str) -> list[str]:
    found = []
    for base, dirs, files in os.walk(os.path.join(root, "deploy")):
        dirs.sort()
        if "kustomization.yaml" in files:
            found.append(rel(root, base))
    return found


def referenced_files(root: str, kdir: str) -> set[str]:
    """Files a kustomization reads (resources and patches), recursively."""
    with open(os.path.join(root, kdir, "kustomization.yaml"), encoding="utf-8") as f:
        k = yaml.safe_load(f) or {}
    out = {os.path.join(kdir, "kustomization.yaml")}
    for entry in k.get("resources") or []:
        path = os.path.normpath(os.path.join(kdir, entry))
        if os.path.isdir(os.path.join(root, path)):
            out |= referenced_files(root, path)
        else:
            out.add(path)
    for entry in k.get("patches") or []:
        if "path" in entry:
            out.add(os.path.normpath(os.path.join(kdir, entry["path"])))
    return out


def render_all(root: str, out: str, report: Report) -> dict[str, list[dict[str, Any]]]:
    report.start("render (kustomize_lite)")
    rendered: dict[str, list[dict[str, Any]]] = {}
    accounted: set[str] = set()
    for kdir in find_kustomizations(root):
        try:
            objects = kustomize_lite.render(os.path.join(root, kdir))
        except kustomize_lite.RenderError as e:
            report.fail(f"{kdir}: {e}")
            continue
        rendered[kdir] = objects
        accounted |= referenced_files(root, kdir)
        kustomize_lite.write(copy.deepcopy(objects), os.path.join(out, "kustomize", kdir.replace("/", "_")))
        report.ok(f"{kdir}: {len(objects)} objects")
    for tree in RESOURCE_TREES:
        for base, dirs, files in os.walk(os.path.join(root, tree)):
            dirs.sort()
            for name in sorted(files):
                if not name.endswith((".yaml", ".yml")):
                    continue
                path = rel(root, os.path.join(base, name))
                if path not in accounted | STANDALONE_OBJECTS | NOT_RESOURCES:
                    report.fail(f"{path}: not listed in any kustomization (add it to `resources`, or to STANDALONE_OBJECTS in {rel(root, __file__)})")
    return rendered


# --- 2. schemas -------------------------------------------------------------


def crd_validators(root: str, version: str) -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    schema_dir = f"v{version}-local-strict"
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(defs) @ Registry()
    out = {}
    for key, filename in CRD_SCHEMAS.items():
        with open(os.path.join(root, "deploy/validate/schemas", filename), encoding="utf-8") as f:
            schema = yaml.safe_load(f)
        schema["$id"] = f"https://kubernetes.io/api/crd/{filename}"
        out[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return out


def validate_schemas(root: str, objects: list[tuple[str, dict[str, Any]]], versions: list[str], report: Report) -> None:
    for version in versions:
        report.start(f"schemas, Kubernetes {version}, strict")
        crds = crd_validators(root, version)
        builtin = crd = 0
        for where, obj in objects:
            key = (obj.get("apiVersion"), obj.get("kind"))
            label = f"{where}: {describe(obj)}"
            if key in crds:
                errors = sorted(crds[key].iter_errors(obj), key=lambda e: list(e.absolute_path))
                for e in errors:
                    path = ".".join(str(p) for p in e.absolute_path) or "(root)"
                    report.fail(f"{label}: {path}: {e.message}")
                crd += 1
                continue
            try:
                kv.validate(obj, version, strict=True)
                builtin += 1
            except kv.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(root)"
                report.fail(f"{label}: {path}: {e.message}")
            except kv.SchemaNotFoundError:
                report.fail(f"{label}: no schema for {key[0]} {key[1]} (add one to deploy/validate/schemas and CRD_SCHEMAS)")
        report.ok(f"{builtin} built-in objects against kubernetes-validate's schemas, {crd} custom resources against deploy/validate/schemas")


# --- 3. Weft invariants -----------------------------------------------------


def parse_duration(text: str) -> float:
    """Seconds in a Weft duration (whole numbers with h, m, s, ms, e.g. 1m30s)."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?", text.strip())
    if not m or not any(m.groups()):
        raise ValueError(f"cannot read duration {text!r}")
    hours, minutes, seconds, millis = (int(g or 0) for g in m.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env") or [] if "name" in e}


def pod_template(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return obj["spec"]["template"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return None


def check_pods(where: str, obj: dict[str, Any], report: Report) -> None:
    template = pod_template(obj)
    if template is None:
        return
    spec = template["spec"]
    name = f"{where}: {describe(obj)}"
    report.check(spec.get("automountServiceAccountToken") is False, f"{name}: automountServiceAccountToken must be false")
    report.check(spec.get("serviceAccountName") == "weft", f"{name}: serviceAccountName must be weft")
    psc = spec.get("securityContext") or {}
    report.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == RUN_AS, f"{name}: pod securityContext must set runAsNonRoot and runAsUser {RUN_AS}")
    for c in (spec.get("initContainers") or []) + spec.get("containers", []):
        cname = f"{name} container {c.get('name')}"
        image = c.get("image", "")
        _, tag, digest = kustomize_lite._split_image(image)
        report.check(bool(digest) or (bool(tag) and tag != "latest"), f"{cname}: image {image!r} must be pinned by tag or digest")
        report.check(c.get("imagePullPolicy") == "IfNotPresent", f"{cname}: imagePullPolicy must be IfNotPresent")
        sc = c.get("securityContext") or {}
        expected = {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
        }
        for key, value in expected.items():
            report.check(sc.get(key) == value, f"{cname}: securityContext.{key} must be {value}")
        report.check((sc.get("capabilities") or {}).get("drop") == ["ALL"], f"{cname}: securityContext.capabilities.drop must be [ALL]")
        report.check((sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{cname}: securityContext.seccompProfile must be RuntimeDefault")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            report.check({"cpu", "memory"} <= set(res.get(kind) or {}), f"{cname}: resources.{kind} must set cpu and memory")
        for secret_env in (e for e in c.get("env") or [] if e.get("name") == "DATABASE_URL"):
            ref = ((secret_env.get("valueFrom") or {}).get("secretKeyRef")) or {}
            report.check(ref == {"name": "weft-database", "key": "url"}, f"{cname}: DATABASE_URL must come from Secret weft-database key url")


def probe_target(probe: dict[str, Any] | None, ports: dict[str, int]) -> tuple[str, int | None]:
    get = (probe or {}).get("httpGet") or {}
    port = get.get("port")
    return get.get("path", ""), ports.get(port, port) if isinstance(port, str) else port


def check_weft_deployments(where: str, objects: list[dict[str, Any]], report: Report) -> list[str]:
    """Returns the Weft namespaces served by worker Deployments."""
    namespaces = []
    pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget"]

    def covered_by_pdb(dep: dict[str, Any]) -> dict[str, Any] | None:
        labels = dep["spec"]["template"]["metadata"].get("labels") or {}
        for pdb in pdbs:
            sel = (pdb["spec"].get("selector") or {}).get("matchLabels") or {}
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                return pdb
        return None

    for dep in (o for o in objects if o["kind"] == "Deployment"):
        name = f"{where}: {describe(dep)}"
        component = (dep["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        containers = dep["spec"]["template"]["spec"]["containers"]
        main = containers[0]
        env = env_of(main)
        ports = {p["name"]: p["containerPort"] for p in main.get("ports") or [] if "name" in p}
        live = probe_target(main.get("livenessProbe"), ports)
        ready = probe_target(main.get("readinessProbe"), ports)
        pdb = covered_by_pdb(dep)
        if component == "orchestrator":
            report.check(main.get("args") == ["orchestrator"], f"{name}: args must be [orchestrator]")
            report.check(env.get("WEFT_MIGRATE") == "false", f"{name}: WEFT_MIGRATE must be \"false\" (the migration Job migrates)")
            report.check(env.get("WEFT_HTTP_ADDR") == "0.0.0.0:8080", f"{name}: WEFT_HTTP_ADDR must be 0.0.0.0:8080")
            report.check(live == ("/health/live", 8080) and ready == ("/health/ready", 8080), f"{name}: probes must be /health/live and /health/ready on 8080, got {live} {ready}")
            report.check((dep["spec"].get("replicas") or 1) >= 2, f"{name}: run at least 2 orchestrators")
            report.check(pdb is not None and pdb["spec"].get("minAvailable") == 1, f"{name}: needs a PodDisruptionBudget with minAvailable 1")
        elif component == "worker":
            label_ns = (dep["metadata"].get("labels") or {}).get("weft/namespace")
            ns = env.get("WEFT_NAMESPACE")
            namespaces.append(ns or "")
            report.check(main.get("args") == ["worker"], f"{name}: args must be [worker]")
            report.check(bool(ns) and re.fullmatch(r"[a-z][a-z0-9_]{0,29}", ns or "") is not None, f"{name}: WEFT_NAMESPACE {ns!r} is not a Weft namespace")
            report.check(label_ns == ns and dep["metadata"]["name"] == f"weft-worker-{ns}", f"{name}: name weft-worker-<ns>, label weft/namespace and WEFT_NAMESPACE must agree ({label_ns!r}, {ns!r})")
            report.check(env.get("WEFT_HTTP_ADDR") == "0.0.0.0:9090", f"{name}: WEFT_HTTP_ADDR must be 0.0.0.0:9090")
            report.check(live == ("/health/live", 9090) and ready == ("/health/ready", 9090), f"{name}: probes must be /health/live and /health/ready on 9090, got {live} {ready}")
            grace = dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            try:
                drain = parse_duration(env.get("WEFT_DRAIN_DEADLINE") or "25s")
                report.check(grace >= drain + 10, f"{name}: terminationGracePeriodSeconds {grace} must exceed WEFT_DRAIN_DEADLINE {drain:g}s by at least 10s")
            except ValueError as e:
                report.fail(f"{name}: WEFT_DRAIN_DEADLINE: {e}")
            report.check("replicas" not in dep["spec"], f"{name}: leave replicas to the autoscaler (see base/worker-demo.yaml)")
            report.check(pdb is not None and pdb["spec"].get("maxUnavailable") == 1, f"{name}: needs a PodDisruptionBudget with maxUnavailable 1")
        else:
            report.fail(f"{name}: label app.kubernetes.io/component must be orchestrator or worker")
    return namespaces


def check_autoscalers(root: str, install: list[dict[str, Any]], report: Report) -> None:
    deployments = {o["metadata"]["name"]: o for o in install if o["kind"] == "Deployment"}
    with open(os.path.join(root, "docs/operations.md"), encoding="utf-8") as f:
        docs = f.read()
    report.check(DEPTH_QUERY.format(ns="<ns>") in docs, f"docs/operations.md must show the depth query verbatim: {DEPTH_QUERY.format(ns='<ns>')}")

    def target_ns(kind: str, name: str, ref: dict[str, Any]) -> str | None:
        dep = deployments.get(ref.get("name", ""))
        if not report.check(ref.get("kind") == "Deployment" and dep is not None, f"{kind} {name}: scaleTargetRef {ref.get('name')} is not a Deployment of the installation"):
            return None
        return env_of(dep["spec"]["template"]["spec"]["containers"][0]).get("WEFT_NAMESPACE")

    for obj in install:
        name = obj["metadata"]["name"]
        if obj["kind"] == "ScaledObject":
            ns = target_ns("ScaledObject", name, obj["spec"]["scaleTargetRef"])
            for trigger in obj["spec"]["triggers"]:
                if trigger["type"] != "postgresql":
                    continue
                query = trigger["metadata"].get("query")
                report.check(query == DEPTH_QUERY.format(ns=ns), f"ScaledObject {name}: query must be the depth query for {ns!r}: {DEPTH_QUERY.format(ns=ns)!r}, got {query!r}")
                report.check("connectionFromEnv" in trigger["metadata"] or "authenticationRef" in trigger, f"ScaledObject {name}: needs connectionFromEnv or authenticationRef")
                auth = (trigger.get("authenticationRef") or {}).get("name")
                if auth:
                    report.check(any(o["kind"] == "TriggerAuthentication" and o["metadata"]["name"] == auth for o in install), f"ScaledObject {name}: TriggerAuthentication {auth} is not shipped")
        elif obj["kind"] == "HorizontalPodAutoscaler":
            ns = target_ns("HorizontalPodAutoscaler", name, obj["spec"]["scaleTargetRef"])
            for metric in obj["spec"].get("metrics") or []:
                ext = metric.get("external") or {}
                sel = ((ext.get("metric") or {}).get("selector") or {}).get("matchLabels") or {}
                report.check(ext.get("metric", {}).get("name") == "weft_queue_depth" and sel == {"queue": f"weft_steps_{ns}"}, f"HorizontalPodAutoscaler {name}: must scale on weft_queue_depth{{queue=\"weft_steps_{ns}\"}}")
        elif obj["kind"] == "PodMonitor":
            names = {p.get("name") for d in deployments.values() for p in d["spec"]["template"]["spec"]["containers"][0].get("ports") or []}
            for ep in obj["spec"]["podMetricsEndpoints"]:
                report.check(ep["port"] in names, f"PodMonitor {name}: port {ep['port']} is not a named port of any Weft pod")
    report.ok("autoscalers and monitors point at shipped objects and use the depth query")


def check_copies(root: str, report: Report) -> None:
    """overlays/example/worker-payments.yaml must stay base/worker-demo.yaml with demo -> payments."""
    base = kustomize_lite.load_documents(os.path.join(root, "deploy/k8s/base/worker-demo.yaml"))
    copy_ = kustomize_lite.load_documents(os.path.join(root, "deploy/k8s/overlays/example/worker-payments.yaml"))
    expected = yaml.safe_load_all(yaml.safe_dump_all(base).replace("demo", "payments"))
    if report.check(list(expected) == copy_, "overlays/example/worker-payments.yaml drifted from base/worker-demo.yaml (it must be the same with demo -> payments)"):
        report.ok("overlays/example/worker-payments.yaml matches base/worker-demo.yaml")


def check_compose(root: str, report: Report) -> None:
    report.start("compose.yaml")
    with open(os.path.join(root, "deploy/compose.yaml"), encoding="utf-8") as f:
        compose = yaml.safe_load(f)
    services = compose.get("services") or {}
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            report.check(dep in services, f"service {name}: depends_on unknown service {dep}")
            report.check(cond.get("condition") in ("service_started", "service_healthy", "service_completed_successfully"), f"service {name}: bad depends_on condition {cond}")
        if str(svc.get("image", "")).startswith(IMAGE_REPO):
            report.check(svc.get("user") == f"{RUN_AS}:{RUN_AS}" and svc.get("read_only") is True, f"service {name}: run as {RUN_AS} with a read-only root filesystem")
            env = svc.get("environment") or {}
            if svc.get("command") == ["worker"]:
                grace = parse_duration(svc.get("stop_grace_period", "10s"))
                drain = parse_duration(env.get("WEFT_DRAIN_DEADLINE", "25s"))
                report.check(grace > drain, f"service {name}: stop_grace_period must exceed WEFT_DRAIN_DEADLINE")
                report.check(env.get("WEFT_HTTP_ADDR", "").startswith("0.0.0.0:"), f"service {name}: bind 0.0.0.0 in a container")
            if svc.get("command") == ["orchestrator"]:
                report.check(env.get("WEFT_MIGRATE") == "false", f"service {name}: WEFT_MIGRATE must be false (the migrate service migrates)")
    report.check("postgres" in services and "healthcheck" in services["postgres"], "postgres needs a healthcheck")
    report.ok(f"{len(services)} services")


# --- 4. PromQL, dashboard, metric names ---------------------------------------


def documented_metrics(root: str) -> set[str]:
    with open(os.path.join(root, "docs/operations.md"), encoding="utf-8") as f:
        return set(re.findall(r"`(weft_[a-z0-9_]+)", f.read()))


def check_promql(expr: str, where: str, known: set[str], report: Report) -> None:
    try:
        parsed = promql_parser.parse(expr)
    except Exception as e:  # the parser raises ValueError, but be safe
        report.fail(f"{where}: PromQL does not parse: {e}: {expr}")
        return
    names: set[str] = set()
    promql_parser.walk(parsed, lambda node: names.add(node.name) if isinstance(node, promql_parser.VectorSelector) and node.name else None)
    for metric in sorted(n for n in names if n.startswith("weft_")):
        family = re.sub(r"_(bucket|sum|count)$", "", metric)
        report.check(metric in known or family in known, f"{where}: metric {metric} is not in docs/operations.md's metric table")


def check_monitoring(root: str, install: list[dict[str, Any]], report: Report) -> None:
    report.start("PromQL, dashboard, adapter rule")
    known = documented_metrics(root)
    n = 0
    for obj in install:
        if obj["kind"] != "PrometheusRule":
            continue
        for group in obj["spec"]["groups"]:
            for rule in group["rules"]:
                check_promql(rule["expr"], f"alert {rule.get('alert') or rule.get('record')}", known, report)
                n += 1
                if "alert" in rule:
                    report.check(rule.get("labels", {}).get("severity") in ("warning", "critical"), f"alert {rule['alert']}: severity must be warning or critical")
                    report.check("summary" in rule.get("annotations", {}), f"alert {rule['alert']}: needs a summary")
                    report.check(rule["alert"] in open(os.path.join(root, "docs/operations.md"), encoding="utf-8").read(), f"alert {rule['alert']}: docs/operations.md must say what to do about it")

    with open(os.path.join(root, "deploy/grafana/weft-dashboard.json"), encoding="utf-8") as f:
        dash = json.load(f)
    ids = [p.get("id") for p in dash.get("panels", [])]
    report.check(len(ids) == len(set(ids)), "dashboard: panel ids must be unique")
    grafana_vars: dict[str, str] = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
    for panel in dash.get("panels", []):
        report.check(bool(panel.get("title")), f"dashboard panel {panel.get('id')}: needs a title")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for var, value in grafana_vars.items():
                expr = expr.replace(var, value)
            check_promql(expr, f"dashboard panel {panel.get('title')!r} target {target.get('refId')}", known, report)
            n += 1

    with open(os.path.join(root, ADAPTER_RULES), encoding="utf-8") as f:
        adapter = yaml.safe_load(f)
    rules = ((adapter or {}).get("rules") or {}).get("external") or []
    report.check(any((r.get("name") or {}).get("as") == "weft_queue_depth" for r in rules), f"{ADAPTER_RULES}: needs an external rule serving weft_queue_depth")
    for r in rules:
        query = r.get("metricsQuery", "")
        report.check("max" in query and "sum" not in query, f"{ADAPTER_RULES}: combine orchestrator replicas with max, never sum")
        query = query.replace("<<.Series>>", "weft_queue_depth").replace("<<.LabelMatchers>>", 'queue="weft_steps_demo"').replace("<<.GroupBy>>", "queue")
        check_promql(query, f"{ADAPTER_RULES} metricsQuery", known, report)
        check_promql(r.get("seriesQuery", ""), f"{ADAPTER_RULES} seriesQuery", known, report)
        n += 2
    report.ok(f"{n} PromQL expressions parsed; metric names all documented")


# --- main ---------------------------------------------------------------------


def install_view(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The example installation: its overlay, plus the kustomizations the docs
    apply with `-n <its namespace>`."""
    objects = copy.deepcopy(rendered.get(INSTALL_OVERLAY, []))
    namespace = next((o["metadata"].get("namespace") for o in objects if o["metadata"].get("namespace")), None)
    for kdir in APPLIED_INTO_INSTALL:
        for obj in copy.deepcopy(rendered.get(kdir, [])):
            if namespace:
                obj["metadata"]["namespace"] = namespace
            objects.append(obj)
    return objects


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="repository root")
    parser.add_argument("--out", required=True, help="directory for rendered manifests (recreated)")
    parser.add_argument("--kubernetes-versions", default="1.29.0", help="comma-separated, e.g. 1.29.0,1.33.0")
    args = parser.parse_args()
    root = os.path.abspath(args.root)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    report = Report()

    rendered = render_all(root, args.out, report)
    objects = [(kdir, o) for kdir, objs in rendered.items() for o in objs]
    for path in sorted(STANDALONE_OBJECTS):
        objects += [(path, o) for o in kustomize_lite.load_documents(os.path.join(root, path))]
    validate_schemas(root, objects, [v.strip() for v in args.kubernetes_versions.split(",") if v.strip()], report)

    report.start("Weft invariants")
    for kdir, objs in rendered.items():
        for obj in objs:
            check_pods(kdir, obj, report)
        check_weft_deployments(kdir, objs, report)
    for obj in rendered.get("deploy/k8s/base", []):
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "weft":
            try:
                report.check(parse_duration(obj["data"].get("WEFT_RETENTION", "")) >= 3600, "ConfigMap weft: WEFT_RETENTION must keep at least 1h")
            except ValueError as e:
                report.fail(f"ConfigMap weft: WEFT_RETENTION must be set, so finished tasks are pruned: {e}")
    install = install_view(rendered)
    if report.check(bool(install), f"{INSTALL_OVERLAY} rendered nothing"):
        check_autoscalers(root, install, report)
    check_copies(root, report)
    check_compose(root, report)
    check_monitoring(root, install, report)

    kustomize_lite.write(install, os.path.join(args.out, "install"))
    shutil.copy(os.path.join(root, "deploy/Dockerfile"), os.path.join(args.out, "install", "Dockerfile"))

    if report.failures:
        print(f"\nvalidate.py: {len(report.failures)} failure(s):", file=sys.stderr)
        for f in report.failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    print(f"validate.py: all checks passed ({len(objects)} objects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
