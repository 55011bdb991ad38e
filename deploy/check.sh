#!/usr/bin/env bash
# Offline validation of deploy/: renders the kustomizations, validates every object against the
# Kubernetes schemas, asserts the DaemonSet's security posture, lints and unit-tests the alert
# rules, and checks the Grafana dashboard's queries. No cluster, no container engine.
#
# Idempotent: installs only what is missing (PyPI kubernetes-validate, into a cached venv if the
# system pip refuses; Debian's prometheus for promtool; Debian's kubernetes-client when there is
# no kubectl). Exits non-zero on the first failing step. Environment: KUBECTL (default: kubectl).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
# kubernetes-validate ships the schemas of many Kubernetes releases; validate against the oldest
# release we support and the newest it knows.
KV_PIN="1.37.0"
K8S_VERSIONS=(1.29.0 1.37.0)
# Capabilities the DaemonSet must add: read from the README's table so docs and manifest agree.
readme="$here/README.md"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

failed=0
total_start=$(date +%s.%N)

# step NAME FUNCTION: runs FUNCTION with errexit in a subshell, prints its time and result.
step() {
    local name="$1" start rc
    shift
    start=$(date +%s.%N)
    set +e
    (
        set -euo pipefail
        "$@"
    )
    rc=$?
    set -e
    local secs
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((rc == 0)); then
        printf 'check: ok    %-58s %5ss\n' "$name" "$secs"
    else
        printf 'check: FAIL  %-58s %5ss\n' "$name" "$secs"
        failed=1
        summary
        exit 1
    fi
}

summary() {
    local secs
    secs=$(awk -v a="$total_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if ((failed)); then
        echo "check: deploy/ FAILED after ${secs}s" >&2
    else
        echo "check: deploy/ ok in ${secs}s"
    fi
}

apt_install() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "check: need root to apt-get install $*" >&2
        return 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine has no package lists yet.
    if ! apt-get install -y --no-install-recommends "$@" >"$work/apt.log" 2>&1; then
        apt-get update -qq >>"$work/apt.log" 2>&1
        apt-get install -y --no-install-recommends "$@" >>"$work/apt.log" 2>&1 || {
            tail -20 "$work/apt.log" >&2
            return 1
        }
    fi
}

# The Python that has kubernetes-validate (and PyYAML, its dependency) with our schemas.
has_validator() {
    "$1" - "${K8S_VERSIONS[@]}" <<'PY' 2>/dev/null
import os, sys, tomllib  # noqa: F401  (tomllib: Python >= 3.11)
import kubernetes_validate, yaml  # noqa: F401
base = os.path.join(os.path.dirname(kubernetes_validate.__file__), "kubernetes-json-schema")
sys.exit(0 if all(os.path.isdir(os.path.join(base, f"v{v}-local-strict")) for v in sys.argv[1:]) else 1)
PY
}

install_tools() {
    command -v python3 >/dev/null || {
        echo "check: python3 (>= 3.11) is required" >&2
        return 1
    }
    local py=python3
    # A Python whose pip refuses to install (PEP 668, Debian's own) gets a private venv.
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/allocwatch/deploy-check-venv"
    if ! has_validator "$py" && [[ -x "$venv/bin/python" ]] && has_validator "$venv/bin/python"; then
        py="$venv/bin/python"
    fi
    if ! has_validator "$py"; then
        echo "check: installing kubernetes-validate==$KV_PIN" >&2
        if ! python3 -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_PIN" >&2; then
            echo "check: pip refused; installing into $venv" >&2
            python3 -m venv "$venv"
            "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KV_PIN" >&2
            py="$venv/bin/python"
        fi
        has_validator "$py"
    fi
    command -v "$py" >"$work/python"
    if ! command -v promtool >/dev/null; then
        echo "check: installing Debian's prometheus (promtool)" >&2
        apt_install prometheus
    fi
    if ! command -v "${KUBECTL:-kubectl}" >/dev/null; then
        echo "check: installing Debian's kubernetes-client (kubectl)" >&2
        apt_install kubernetes-client
    fi
    "${KUBECTL:-kubectl}" version --client >/dev/null 2>&1
    promtool --version >/dev/null
}

render() {
    local kubectl="${KUBECTL:-kubectl}"
    "$kubectl" kustomize "$here/kustomize/base" >"$work/base.yaml"
    "$kubectl" kustomize "$here/kustomize/prometheus-operator" >"$work/prometheus-operator.yaml"
    test -s "$work/base.yaml" && test -s "$work/prometheus-operator.yaml"
}

validate_schemas() {
    local v out
    for v in "${K8S_VERSIONS[@]}"; do
        # --strict rejects unknown fields. A kind without a schema is only a warning there, so
        # any warning fails too: everything in the base must be a built-in kind.
        out="$("$(cat "$work/python")" -m kubernetes_validate --strict --kubernetes-version "$v" --quiet "$work/base.yaml" 2>&1)" || {
            echo "$out" >&2
            return 1
        }
        if [[ -n "$out" ]]; then
            echo "$out" >&2
            return 1
        fi
    done
    "$(cat "$work/python")" - "$work/base.yaml" <<'PY'
import sys, yaml
kinds = sorted(d["kind"] for d in yaml.safe_load_all(open(sys.argv[1])) if d)
want = sorted(["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Service"])
assert kinds == want, f"rendered kinds {kinds}, expected {want}"
PY
}

check_crds() {
    "$(cat "$work/python")" - "$work/base.yaml" "$work/prometheus-operator.yaml" "$here/alerts/allocwatch.rules.yaml" "$work" <<'PY'
import os, sys, yaml
base = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
po = [d for d in yaml.safe_load_all(open(sys.argv[2])) if d]
alerts = yaml.safe_load(open(sys.argv[3]))
work = sys.argv[4]
errors = []
def need(cond, msg):
    if not cond:
        errors.append(msg)

ds = next(d for d in base if d["kind"] == "DaemonSet")
pod_labels = ds["spec"]["template"]["metadata"]["labels"]
ports = {p["name"] for c in ds["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
by_kind = {d["kind"]: d for d in po}
need(sorted(by_kind) == ["PodMonitor", "PrometheusRule"], f"overlay kinds {sorted(by_kind)}")
for d in po:
    need(d.get("apiVersion") == "monitoring.coreos.com/v1", f"{d['kind']}: apiVersion {d.get('apiVersion')}")
    need(d["metadata"].get("namespace") == ds["metadata"]["namespace"], f"{d['kind']}: namespace")
    need(bool(d["metadata"].get("name")), f"{d['kind']}: name")

pm = by_kind.get("PodMonitor", {})
spec = pm.get("spec", {})
sel = spec.get("selector", {}).get("matchLabels", {})
need(sel and all(pod_labels.get(k) == v for k, v in sel.items()), f"PodMonitor selector {sel} does not match pod labels {pod_labels}")
allowed = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "sampleLimit"}
need(set(spec) <= allowed, f"PodMonitor: unexpected spec fields {set(spec) - allowed}")
eps = spec.get("podMetricsEndpoints", [])
need(len(eps) > 0, "PodMonitor: no podMetricsEndpoints")
ep_fields = {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings", "honorLabels", "scheme"}
for ep in eps:
    need(set(ep) <= ep_fields, f"PodMonitor endpoint: unexpected fields {set(ep) - ep_fields}")
    need(ep.get("port") in ports, f"PodMonitor port {ep.get('port')} not among container ports {ports}")
    for r in ep.get("relabelings", []):
        need(set(r) <= {"sourceLabels", "targetLabel", "regex", "action", "replacement", "separator", "modulus"},
             f"PodMonitor relabeling fields {set(r)}")

pr = by_kind.get("PrometheusRule", {})
need(set(pr.get("spec", {})) == {"groups"}, "PrometheusRule: spec must hold groups only")
need(pr.get("spec", {}).get("groups") == alerts["groups"],
     "PrometheusRule groups differ from deploy/alerts/allocwatch.rules.yaml")
with open(os.path.join(work, "prometheusrule.rules.yaml"), "w") as f:
    yaml.safe_dump({"groups": pr.get("spec", {}).get("groups", [])}, f)
if errors:
    sys.exit("\n".join(errors))
PY
}

check_security() {
    "$(cat "$work/python")" - "$work/base.yaml" "$readme" <<'PY'
import re, sys, tomllib, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
readme = open(sys.argv[2]).read()
errors = []
def need(cond, msg):
    if not cond:
        errors.append(msg)

# The documented capability set: backticked names in the first column of the table under
# "## Required capabilities".
section = readme.split("## Required capabilities", 1)[1].split("\n## ", 1)[0]
table = section.split("| Capability | Why |", 1)[1].split("\n\n", 1)[0]
documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.M))
need(documented >= {"BPF", "PERFMON"}, f"README capability table unreadable: {documented}")

ds = next(d for d in docs if d["kind"] == "DaemonSet")
pod = ds["spec"]["template"]["spec"]
need(pod.get("hostPID") is True, "hostPID must be true")
need(not pod.get("hostNetwork"), "hostNetwork must be off")
need(not pod.get("hostIPC"), "hostIPC must be off")
need(pod.get("serviceAccountName") == "allocwatch", "serviceAccountName")
pod_sc = pod.get("securityContext", {})
# The agent becomes group 65532 after startup (agent/src/privilege.rs): fsGroup gives it the
# projected service-account token, which is root's and 0600 otherwise.
need(pod_sc.get("fsGroup") == 65532, f"pod securityContext.fsGroup must be 65532, is {pod_sc.get('fsGroup')}")
need(any(t.get("operator") == "Exists" and not t.get("key") for t in pod.get("tolerations", [])),
     "tolerations must include operator: Exists (all nodes)")

volumes = {v["name"]: v for v in pod.get("volumes", [])}
host_paths = {n for n, v in volumes.items() if "hostPath" in v}
containers = pod.get("containers", []) + pod.get("initContainers", [])
need(len(pod.get("containers", [])) == 1, "exactly one container")
for c in containers:
    name = c["name"]
    sc = c.get("securityContext", {})
    need(sc.get("privileged") is False, f"{name}: privileged must be false")
    need(sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation must be false")
    need(sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem must be true")
    need(sc.get("runAsUser") == 0, f"{name}: runAsUser must be 0 (capabilities are effective only for root; the agent drops to 65532 itself)")
    for cap in ("SETUID", "SETGID", "SETPCAP", "SYS_PTRACE"):
        need(cap in sc.get("capabilities", {}).get("add", []), f"{name}: {cap} is needed to drop privileges after startup")
    caps = sc.get("capabilities", {})
    need(caps.get("drop") == ["ALL"], f"{name}: capabilities.drop must be [ALL], is {caps.get('drop')}")
    added = caps.get("add", [])
    need(len(added) == len(set(added)), f"{name}: duplicate capabilities {added}")
    need(set(added) == documented,
         f"{name}: capabilities.add {sorted(added)} != documented in README {sorted(documented)}")
    need("SYS_ADMIN" not in added and "ALL" not in added, f"{name}: SYS_ADMIN/ALL must not be added")
    seccomp = sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}
    need(seccomp.get("type") == "RuntimeDefault", f"{name}: seccompProfile must be RuntimeDefault")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            need(r in res.get(kind, {}), f"{name}: resources.{kind}.{r} missing")
    for m in c.get("volumeMounts", []):
        if m["name"] in host_paths:
            need(m.get("readOnly") is True, f"{name}: hostPath mount {m['mountPath']} must be readOnly")
        need(m["name"] in volumes, f"{name}: mount of undefined volume {m['name']}")
    for probe in ("livenessProbe", "readinessProbe"):
        p = c.get(probe, {}).get("httpGet", {})
        need(p.get("path") == "/healthz", f"{name}: {probe} must GET /healthz")
    env = {e["name"]: e for e in c.get("env", [])}
    need(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
         f"{name}: NODE_NAME must come from spec.nodeName")

agent = pod["containers"][0]
args = agent.get("args", [])
need(args[:1] == ["agent"], f"args must start with the agent subcommand: {args}")
need("--keep-privileges" not in args, "the agent must drop its privileges after startup (no --keep-privileges)")
def flag(f):
    return args[args.index(f) + 1] if f in args and args.index(f) + 1 < len(args) else None
listen = flag("--listen")
port = {p["name"]: p["containerPort"] for p in agent.get("ports", [])}.get("metrics")
need(listen is not None and listen.rsplit(":", 1)[-1] == str(port), f"--listen {listen} vs metrics port {port}")
config_path = flag("--config")
mounts = {m["mountPath"]: m for m in agent.get("volumeMounts", [])}
cm_mount = next((m for p, m in mounts.items() if config_path and config_path.startswith(p + "/")), None)
need(cm_mount is not None and cm_mount.get("readOnly") is True, f"--config {config_path} must be on a read-only mount")
if cm_mount:
    cm_name = volumes[cm_mount["name"]].get("configMap", {}).get("name")
    cm = next((d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name), None)
    need(cm is not None, f"ConfigMap {cm_name} not rendered")
    key = config_path.rsplit("/", 1)[-1]
    try:
        cfg = tomllib.loads(cm["data"][key])
        need(cfg.get("listen", "").rsplit(":", 1)[-1] == str(port), "config.toml listen port differs from the DaemonSet's")
        need(cfg.get("keep_privileges") is False, "config.toml must have keep_privileges = false")
    except (KeyError, TypeError, tomllib.TOMLDecodeError) as e:
        need(False, f"config {key} in ConfigMap {cm_name}: {e}")

# RBAC: read-only pods, nothing else.
role = next(d for d in docs if d["kind"] == "ClusterRole")
need(role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
     f"ClusterRole rules must be pods get/list/watch only: {role['rules']}")
binding = next(d for d in docs if d["kind"] == "ClusterRoleBinding")
need(binding["subjects"] == [{"kind": "ServiceAccount", "name": "allocwatch", "namespace": ds["metadata"]["namespace"]}],
     f"ClusterRoleBinding subjects: {binding['subjects']}")

svc = next(d for d in docs if d["kind"] == "Service")
need(svc["spec"]["selector"].items() <= ds["spec"]["template"]["metadata"]["labels"].items(), "Service selector")
need(any(p.get("name") == "metrics" and p.get("port") == port for p in svc["spec"]["ports"]), "Service port metrics")
ns = next(d for d in docs if d["kind"] == "Namespace")
need(ns["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "privileged",
     "namespace must admit the agent (pod-security enforce: privileged)")
if errors:
    sys.exit("\n".join(errors))
PY
}

check_rules() {
    promtool check rules "$here"/alerts/*.yaml >"$work/promtool.log" 2>&1 || {
        cat "$work/promtool.log" >&2
        return 1
    }
    promtool check rules "$work/prometheusrule.rules.yaml" >"$work/promtool-pr.log" 2>&1 || {
        cat "$work/promtool-pr.log" >&2
        return 1
    }
    # Every alert carries a summary and a description.
    "$(cat "$work/python")" - "$here"/alerts/*.yaml <<'PY'
import sys, yaml
errors = []
for path in sys.argv[1:]:
    for g in yaml.safe_load(open(path))["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                a = r.get("annotations", {})
                if not a.get("summary") or not a.get("description"):
                    errors.append(f"{path}: {r['alert']} needs summary and description")
                if not r.get("labels", {}).get("severity"):
                    errors.append(f"{path}: {r['alert']} needs a severity label")
if errors:
    sys.exit("\n".join(errors))
PY
    (cd "$here/alerts/tests" && promtool test rules ./*.yaml) >"$work/promtool-test.log" 2>&1 || {
        cat "$work/promtool-test.log" >&2
        return 1
    }
}

check_dashboard() {
    "$(cat "$work/python")" - "$here/grafana/allocwatch-dashboard.json" "$work/dashboard.rules.yaml" <<'PY'
import json, re, sys, yaml
dash = json.load(open(sys.argv[1]))
errors = []
def need(cond, msg):
    if not cond:
        errors.append(msg)
need(dash.get("schemaVersion", 0) >= 36, f"schemaVersion {dash.get('schemaVersion')} < 36")
need(bool(dash.get("uid")) and bool(dash.get("title")), "uid and title")
variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
ds_var = variables.get("DS_PROMETHEUS", {})
need(ds_var.get("type") == "datasource" and ds_var.get("query") == "prometheus", "DS_PROMETHEUS datasource variable")
for name in ("namespace", "pod", "container"):
    need(variables.get(name, {}).get("type") == "query", f"query variable {name}")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}

def panels(ps):
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))

exprs = []
for v in variables.values():
    if v.get("type") == "query":
        need(v.get("datasource") == DS, f"variable {v['name']}: datasource must be ${{DS_PROMETHEUS}}")
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q or "")
        need(m is not None, f"variable {v['name']}: unexpected query {q!r}")
        if m:
            exprs.append((f"variable {v['name']}", m.group(1)))
ids = set()
count = 0
for p in panels(dash.get("panels", [])):
    need(p.get("id") not in ids, f"duplicate panel id {p.get('id')}")
    ids.add(p.get("id"))
    if p.get("type") == "row":
        continue
    count += 1
    title = p.get("title", "?")
    need(p.get("datasource") == DS, f"panel {title!r}: datasource must be ${{DS_PROMETHEUS}}")
    targets = p.get("targets", [])
    need(len(targets) > 0, f"panel {title!r}: no targets")
    for t in targets:
        need(t.get("datasource") == DS, f"panel {title!r} target {t.get('refId')}: datasource")
        need(bool(t.get("expr")), f"panel {title!r} target {t.get('refId')}: no expr")
        if t.get("expr"):
            exprs.append((f"panel {title!r} {t.get('refId')}", t["expr"]))
need(count >= 8, f"only {count} panels")

# Metric names: every allocwatch_ metric must be documented in the README table; other metrics
# only `up`.
readme = open(sys.argv[1].rsplit("/grafana/", 1)[0] + "/README.md").read()
documented = set(re.findall(r"^\| `(allocwatch_[a-z0-9_]+)` \|", readme, re.M))
alerts = yaml.safe_load(open(sys.argv[1].rsplit("/grafana/", 1)[0] + "/alerts/allocwatch.rules.yaml"))
alert_exprs = [(f"alert {r.get('alert')}", r["expr"]) for g in alerts["groups"] for r in g["rules"]]
FUNCS = {"sum", "rate", "increase", "deriv", "max", "min", "avg", "count", "topk", "bottomk", "by", "without",
         "histogram_quantile", "absent", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
         "irate", "delta", "max_over_time", "min_over_time", "avg_over_time", "label_values", "le", "offset",
         "bool", "clamp_min", "clamp_max", "scalar", "vector", "time"}
for where, e in exprs + alert_exprs:
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)          # drop string literals
    stripped = re.sub(r"\{[^}]*\}", "{}", stripped)          # and label matchers
    stripped = re.sub(r"\[[^\]]*\]", "[]", stripped)         # and ranges
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", stripped)  # grouping labels
    for name in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", stripped):
        if name in FUNCS or name.startswith("__"):
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name.startswith("allocwatch_"):
            need(name in documented or base in documented, f"{where}: metric {name} not in README's metrics table")
        else:
            need(name == "up", f"{where}: unexpected metric or function {name!r}")

# The table's types and labels (the exporter's family specs, agent/src/serve/metrics/families.rs,
# which a unit test keeps equal to the table): rate-like functions only over counters (or a
# histogram's series), and label matchers only on labels the family has.
IDENTITY = {"namespace", "pod", "container", "comm", "exe"}
TARGET = {"instance", "job"}
families = {}
for m in re.finditer(r"^\| `(allocwatch_[a-z0-9_]+)` \| (counter|gauge|histogram)( \(agent\))? \|([^|]*)\|", readme, re.M):
    own = set(re.findall(r"`([a-z_]+)`", m.group(4)))
    families[m.group(1)] = (m.group(2), own | TARGET | (set() if m.group(3) else IDENTITY))
need(set(families) == documented, "README metrics table: a row without a type")
def family_of(name):
    if name in families:
        return name, ""
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    if families.get(base, ("",))[0] == "histogram":
        return base, name[len(base):]
    return None, None
for where, e in exprs + alert_exprs:
    for m in re.finditer(r"\b(rate|irate|increase)\(\s*(allocwatch_[a-z0-9_]+)", e):
        fam, part = family_of(m.group(2))
        if fam:
            kind = families[fam][0]
            need(kind == "counter" or (kind == "histogram" and part),
                 f"{where}: {m.group(1)}() over {m.group(2)}, a {kind}")
    for m in re.finditer(r"\b(allocwatch_[a-z0-9_]+)\s*\{([^}]*)\}", e):
        fam, part = family_of(m.group(1))
        if not fam:
            continue
        allowed = families[fam][1] | ({"le"} if part == "_bucket" else set())
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)):
            need(label in allowed, f"{where}: {m.group(1)} has no label {label!r}")

# Compile every query with promtool: as recording rules, Grafana's variables substituted.
def concrete(e):
    e = e.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", e)
rules = [{"record": f"dashboard:query:{i}", "expr": concrete(e)} for i, (_, e) in enumerate(exprs)]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
if errors:
    sys.exit("\n".join(errors))
PY
    promtool check rules "$work/dashboard.rules.yaml" >"$work/promtool-dash.log" 2>&1 || {
        cat "$work/promtool-dash.log" >&2
        return 1
    }
}

check_dockerfile() {
    local want have
    want="$(sed -n 's/^const BPF_LINKER_VERSION: &str = "\(.*\)";/\1/p' "$root/xtask/src/setup.rs")"
    have="$(sed -n 's/^ARG BPF_LINKER_VERSION=\(.*\)/\1/p' "$here/Dockerfile")"
    if [[ -z "$want" || "$want" != "$have" ]]; then
        echo "Dockerfile BPF_LINKER_VERSION '$have' != xtask/src/setup.rs '$want'" >&2
        return 1
    fi
    grep -q '^FROM .* AS builder$' "$here/Dockerfile"
    grep -q '^FROM gcr.io/distroless/cc-debian12 AS runtime$' "$here/Dockerfile"
    grep -q '^ENTRYPOINT \["/usr/local/bin/allocwatch"\]$' "$here/Dockerfile"
}

step "tools (kubernetes-validate, promtool, kubectl)" install_tools
step "render kustomize base and prometheus-operator" render
step "schemas: kubernetes-validate --strict ${K8S_VERSIONS[*]}" validate_schemas
step "PodMonitor/PrometheusRule structure" check_crds
step "DaemonSet security posture, RBAC, config" check_security
step "alert rules: promtool check + test" check_rules
step "Grafana dashboard: panels, metrics, queries" check_dashboard
step "Dockerfile pins" check_dockerfile
summary
