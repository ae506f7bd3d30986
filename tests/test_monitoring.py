"""monitoring/: the Prometheus config, the alert rules and their unit tests, the Grafana dashboard.

    promtool check config / check rules / test rules   the files as shipped
    broken expressions                                  each alert made never / always firing: its tests fail
    metric names                                        every name and label the rules and the dashboard use
                                                        is on the /metrics of a real server after real requests
                                                        (the end-to-end traffic, so it needs `prometheus` too)
    end to end                                          the real `prometheus` scrapes a real server through
                                                        prometheus.yml's own relabelling, loads alerts.yml,
                                                        and answers every record and dashboard query

Debian's Prometheus is built without Kubernetes discovery, so the Kubernetes job is checked and run
with its `kubernetes_sd_configs` replaced by static targets that carry the `__meta_kubernetes_*`
labels the pod role would give: the relabelling that keeps, drops and labels pods runs for real.
"""
from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import require_tool  # noqa: E402
from server_utils import ROOT, ServerProcess, free_port, tiny_checkpoint, wait_http_ok  # noqa: E402

MON = ROOT / "monitoring"
PROMETHEUS_YML = MON / "prometheus.yml"
ALERTS_YML = MON / "alerts.yml"
ALERTS_TEST_YML = MON / "alerts_test.yml"
DASHBOARD = MON / "grafana" / "code-assistant.json"
RUNBOOK = MON / "README.md"
JOB = "code-assistant"

KEY, HAMMER_KEY, SLOW_KEY, FLOOD_KEY = ("mon-key-main-1111", "mon-key-hammer-2222", "mon-key-slow-3333",
                                        "mon-key-flood-4444")
# The server admits MAX_CONCURRENT_SEQUENCES + MAX_QUEUE requests at once, then answers 429 server_overloaded.
MAX_CONCURRENT_SEQUENCES, MAX_QUEUE = 4, 2
MAX_IN_FLIGHT = MAX_CONCURRENT_SEQUENCES + MAX_QUEUE
NAMESPACE, POD = "code-assistant", "code-assistant-7d9f-abcde"
# Records tested only through the alert built on them.
UNTESTED_RECORDS = {"code_assistant:time_to_first_token_seconds:p95_5m", "code_assistant:queue_time_seconds:p95_5m"}
# Grafana's variables as one pod's view would substitute them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$namespace": NAMESPACE, "$pod": POD}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    promtool = require_tool("promtool", "prometheus")
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


# ---- a small PromQL reader -----------------------------------------------------------------------
# Enough of the grammar to say which series and labels an expression reads: strings, durations,
# numbers, identifiers, matchers, grouping clauses. Function names are told apart by the `(`
# that follows them; aggregations also by a following by/without.

_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<dur>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
  | (?P<num>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
""", re.X)
AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values"}
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


@dataclass
class Selector:
    name: str
    matchers: dict[str, str] = field(default_factory=dict)  # label -> value (any operator)


@dataclass
class Parsed:
    selectors: list[Selector] = field(default_factory=list)
    grouping_labels: set[str] = field(default_factory=set)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m, f"cannot read PromQL at {expr[pos:pos + 30]!r} in {expr!r}"
        pos = m.end()
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group()))
    return tokens


def parse_promql(expr: str) -> Parsed:
    toks = tokenize(expr)
    out = Parsed()
    i = 0

    def matchers(j: int) -> tuple[dict[str, str], int]:
        """Reads `{a="x", b=~"y"}` from toks[j] == '{'; returns the matchers and the index after '}'."""
        found: dict[str, str] = {}
        j += 1
        while toks[j][1] != "}":
            if toks[j][1] == ",":
                j += 1
                continue
            kind, label = toks[j]
            assert kind == "ident" and toks[j + 1][1] in ("=", "!=", "=~", "!~") and toks[j + 2][0] == "str", \
                f"bad matcher near {toks[j:j + 3]} in {expr!r}"
            found[label] = toks[j + 2][1][1:-1]
            j += 3
        return found, j + 1

    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "op" and text == "[":  # a range or subquery: durations only
            while toks[i][1] != "]":
                i += 1
            i += 1
        elif kind == "op" and text == "{":  # a selector without a name
            found, i = matchers(i)
            out.selectors.append(Selector(found.get("__name__", ""), found))
        elif kind == "ident" and text.lower() in GROUPING:
            i += 1
            if i < len(toks) and toks[i][1] == "(":  # group_left / group_right may have no list
                i += 1
                while toks[i][1] != ")":
                    if toks[i][0] == "ident":
                        out.grouping_labels.add(toks[i][1])
                    i += 1
                i += 1
        elif kind == "ident" and text.lower() == "offset":
            i += 2
        elif kind == "ident" and (nxt == "(" or (text in AGGREGATIONS and nxt in GROUPING)
                                  or text.lower() in KEYWORDS):
            i += 1  # a function, an aggregation, or an operator word
        elif kind == "ident":
            found, i = matchers(i + 1) if nxt == "{" else ({}, i + 1)
            out.selectors.append(Selector(text, found))
        else:
            i += 1
    return out


def test_promql_reader_sees_names_labels_and_groupings() -> None:
    p = parse_promql('histogram_quantile(0.95, sum by (le, job) (rate(a_bucket{x=~"1|2", y!="z"}[5m] offset 1h)))'
                     ' / on (job) group_left max without (pod) (b) > bool 1e3 or c:rec * 0 and vector(1)'
                     ' unless sum(d{e="}"}) by (f)')
    assert [(s.name, s.matchers) for s in p.selectors] == [
        ("a_bucket", {"x": "1|2", "y": "z"}), ("b", {}), ("c:rec", {}), ("d", {"e": "}"})]
    assert p.grouping_labels == {"le", "job", "pod", "f"}


# ---- what the files define ----------------------------------------------------------------------

def rules() -> list[dict]:
    return [r for g in load_yaml(ALERTS_YML)["groups"] for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def records() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in rules() if "record" in r}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict]:
    """Every panel, those inside collapsed rows included."""
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query target."""
    return [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]


def variable_queries() -> dict[str, tuple[str, str]]:
    """name -> (selector, label) of each `label_values(selector, label)` template variable."""
    out = {}
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert m, f"variable {v['name']}: {query!r} is not label_values(selector, label)"
            out[v["name"]] = (m.group(1), m.group(2))
    return out


def grafana_substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr!r}"
    return expr


def target_labels() -> set[str]:
    """Labels Prometheus puts on every series of the job: job, instance and prometheus.yml's relabelling."""
    job = next(j for j in load_yaml(PROMETHEUS_YML)["scrape_configs"] if j["job_name"] == JOB)
    added = {r.get("target_label", "") for r in job["relabel_configs"]} - {""}
    added = {label for label in added if not label.startswith("__")}
    return {"job", "instance"} | added


def every_expression() -> list[tuple[str, str]]:
    """(where, PromQL) for the rules, the dashboard panels and the variable queries."""
    out = [(r.get("alert") or r["record"], r["expr"]) for r in rules()]
    out += [(f"panel {title!r}", grafana_substitute(e)) for title, e in dashboard_exprs()]
    out += [(f"variable {name}", grafana_substitute(sel)) for name, (sel, _) in variable_queries().items()]
    return out


# ---- static checks --------------------------------------------------------------------------------

def simulated_k8s_config(server_port: int) -> dict:
    """prometheus.yml with its pod discovery replaced by the targets it would find: our pod (with the
    annotations and labels of k8s/) and three pods its relabelling must drop."""
    config = load_yaml(PROMETHEUS_YML)
    job = next(j for j in config["scrape_configs"] if j["job_name"] == JOB)
    sd = job.pop("kubernetes_sd_configs")
    assert sd == [{"role": "pod", "namespaces": {"names": [NAMESPACE]}}], sd

    def pod(name: str, scrape: str = "true", app: str = "code-assistant", phase: str = "Running") -> dict:
        return {"targets": ["127.0.0.1:9"],  # the container port; the annotation's port must replace it
                "labels": {"__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": name,
                           "__meta_kubernetes_pod_node_name": "node-a", "__meta_kubernetes_pod_phase": phase,
                           "__meta_kubernetes_pod_label_app_kubernetes_io_name": app,
                           "__meta_kubernetes_pod_label_app_kubernetes_io_version": "1.0",
                           "__meta_kubernetes_pod_annotation_prometheus_io_scrape": scrape,
                           "__meta_kubernetes_pod_annotation_prometheus_io_port": str(server_port),
                           "__meta_kubernetes_pod_annotation_prometheus_io_path": "/metrics"}}

    job["static_configs"] = [pod(POD), pod("no-annotation", scrape="false"), pod("redis-0", app="redis"),
                             pod("old-job", phase="Succeeded")]
    return config


def test_promtool_check_config(tmp_path: Path) -> None:
    # rule_files resolve next to the config file: check from another directory
    probe = tmp_path / "probe.yml"
    probe.write_text("scrape_configs:\n  - job_name: p\n    kubernetes_sd_configs: [{role: pod}]\n")
    if run_promtool("check", "config", str(probe), cwd=tmp_path).returncode == 0:  # an upstream build
        r = run_promtool("check", "config", str(PROMETHEUS_YML), cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    # the Kubernetes job as it runs (see the module docstring), rules next to it
    (tmp_path / "k8s").mkdir()
    shutil.copy(ALERTS_YML, tmp_path / "k8s" / "alerts.yml")
    (tmp_path / "k8s" / "prometheus.yml").write_text(yaml.safe_dump(simulated_k8s_config(8000)))
    r = run_promtool("check", "config", "k8s/prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0 and f"SUCCESS: {len(rules())} rules found" in r.stdout, r.stdout + r.stderr
    # the commented local job, commented in instead of the Kubernetes one
    text = PROMETHEUS_YML.read_text(encoding="utf-8")
    local = re.search(r"^  # - job_name: code-assistant\n(?:^  #   .*\n)+", text, re.M)
    assert local, "the commented static job is missing from prometheus.yml"
    config = load_yaml(PROMETHEUS_YML)
    config["scrape_configs"] = yaml.safe_load(re.sub(r"^  # ?", "", local.group(), flags=re.M))
    (tmp_path / "local").mkdir()
    shutil.copy(ALERTS_YML, tmp_path / "local" / "alerts.yml")
    (tmp_path / "local" / "prometheus.yml").write_text(yaml.safe_dump(config))
    r = run_promtool("check", "config", "local/prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_and_test_rules() -> None:
    r = run_promtool("check", "rules", str(ALERTS_YML))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_promtool("test", "rules", ALERTS_TEST_YML.name, cwd=MON)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_has_for_severity_annotations_runbook_and_tests() -> None:
    runbook = RUNBOOK.read_text(encoding="utf-8")
    headings = {re.sub(r"[^a-z0-9_-]", "", h.strip().lower().replace(" ", "-"))
                for h in re.findall(r"^#+ (.+)$", runbook, re.M)}
    tests = load_yaml(ALERTS_TEST_YML)["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 10
    for a in alerts():
        name = a["alert"]
        assert re.fullmatch(r"\d+[smh]", a.get("for", "")), f"{name}: no `for:`"
        assert a["labels"]["severity"] in ("warning", "critical"), name
        assert a["annotations"]["summary"] and a["annotations"]["description"], name
        anchor = a["annotations"]["runbook"]
        assert anchor == f"monitoring/README.md#{name.lower()}" and name.lower() in headings, \
            f"{name}: no runbook section '## {name}' in monitoring/README.md"
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it must stay quiet"
    tested_records = {e["expr"] for t in tests for e in t.get("promql_expr_test", [])}
    assert set(records()) - UNTESTED_RECORDS <= tested_records


def mutate_and_test(directory: Path, target: str, new_expr: str, firing: bool | None = None) -> subprocess.CompletedProcess:
    """The unit tests that name `target` (an alert or a record), run against alerts.yml with that
    rule's expression replaced; for an alert, only its firing cases (`firing`) or its quiet ones."""
    doc = load_yaml(ALERTS_YML)
    hits = 0
    for group in doc["groups"]:
        for rule in group["rules"]:
            if target in (rule.get("alert"), rule.get("record")):
                rule["expr"] = new_expr
                hits += 1
    assert hits == 1, target
    kept = []
    for t in load_yaml(ALERTS_TEST_YML)["tests"]:
        cases = [c for c in t.get("alert_rule_test", [])
                 if c["alertname"] == target and bool(c["exp_alerts"]) == firing]
        exprs = [e for e in t.get("promql_expr_test", []) if e["expr"] == target]
        if cases or exprs:
            kept.append({**t, "alert_rule_test": cases, "promql_expr_test": exprs})
    assert kept, f"no unit test names {target}"
    tests = {**load_yaml(ALERTS_TEST_YML), "tests": kept}
    directory.mkdir()
    (directory / "alerts.yml").write_text(yaml.safe_dump(doc))
    (directory / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    return run_promtool("test", "rules", "alerts_test.yml", cwd=directory)


def test_a_broken_rule_fails_its_unit_tests(tmp_path: Path) -> None:
    # An alert that never fires must fail its firing cases; one that always fires (with the job's
    # label) must fail its quiet cases; a record that returns junk must fail its expected values.
    never, always = "vector(1) < 0", 'label_replace(vector(1), "job", "code-assistant", "", "")'
    mutations = [(a["alert"], never, True) for a in alerts()] + [(a["alert"], always, False) for a in alerts()]
    mutations += [(record, "vector(42)", None) for record in records() if record not in UNTESTED_RECORDS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # promtool mostly waits: overlap the runs
        results = list(pool.map(lambda m: mutate_and_test(tmp_path / str(m[0]), *m[1]), enumerate(mutations)))
    unseen = [f"{target} as {expr!r}" for (target, expr, _), r in zip(mutations, results)
              if r.returncode == 0 or "FAILED" not in r.stderr]
    assert not unseen, f"broken rules whose unit tests still pass: {unseen}"


def test_dashboard_shape() -> None:
    d = dashboard()
    assert 38 <= d["schemaVersion"] <= 41 and d["uid"] == "code-assistant"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("namespace", "pod"):
        v = variables[name]
        assert v["includeAll"] and v["allValue"] == ".*" and v["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids))
    for p in dashboard_panels():
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    # every series a panel reads follows the job and the two variables
    for title, expr in dashboard_exprs():
        for s in parse_promql(grafana_substitute(expr)).selectors:
            assert s.matchers.get("job") == JOB, f"{title}: {s.name} without job={JOB!r}"
            assert s.matchers.get("namespace") == NAMESPACE and s.matchers.get("pod") == POD, \
                f"{title}: {s.name} does not follow $namespace / $pod"
    titles = " ".join(t.lower() for t, _ in dashboard_exprs())
    for topic in ("error ratio", "latency", "time to first token", "time per output token", "tokens per second",
                  "in flight", "kv cache", "gpu memory", "cache hit ratio", "429"):
        assert topic in titles, f"no panel on {topic}"


# ---- a real server, scraped by the real prometheus ---------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Keys (401), a small per-key rate limit (429 rate_limit_exceeded), room for 6 requests at once
    (429 server_overloaded), a 1 s timeout on 20 ms engine steps (504, and a stream's timeout event)."""
    ckpt = tiny_checkpoint(tmp_path_factory)
    env = {"API_KEYS": f"{KEY},{HAMMER_KEY},{SLOW_KEY},{FLOOD_KEY}", "RATE_LIMIT_PER_MINUTE": "20",
           "REQUEST_TIMEOUT_S": "1", "CODE_ASSISTANT_TEST_STEP_DELAY_MS": "20",
           "MAX_CONCURRENT_SEQUENCES": str(MAX_CONCURRENT_SEQUENCES), "MAX_QUEUE": str(MAX_QUEUE), "CACHE_SIZE": "64"}
    with ServerProcess(ckpt, env) as srv:
        yield srv


class PrometheusProcess:
    """The real `prometheus` on a free loopback port, TSDB in a temporary directory."""

    def __init__(self, config: dict, rules_file: Path) -> None:
        binary = require_tool("prometheus", "prometheus")
        self.dir = Path(tempfile.mkdtemp(prefix="prometheus-"))
        shutil.copy(rules_file, self.dir / "alerts.yml")
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.dir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            cwd=str(self.dir), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_http_ok(self.proc, self.url + "/-/ready", 30, self.logs, name="prometheus")
        except (RuntimeError, TimeoutError):
            self.close()
            raise

    def logs(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-4000:]

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {r.text}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_until(cond: Any, timeout: float, what: str, interval: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess) -> Iterator[PrometheusProcess]:
    config = simulated_k8s_config(server.port)
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    prom = PrometheusProcess(config, ALERTS_YML)
    try:
        wait_until(lambda: prom.query(f'up{{job="{JOB}"}} == 1'), 20, "the first successful scrape")
        yield prom
    finally:
        prom.close()


@dataclass
class Traffic:
    statuses: list[int] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)  # the error code of every 429 the clients got
    stream_errors: Counter = field(default_factory=Counter)  # the code of every stream's error event


def send_traffic(server: ServerProcess, long_prompt: str, out: Traffic, flood: bool = False) -> None:
    """One round of real requests: 200s (plain, FIM, streamed, a cache hit), 400, 401, 404, 429
    (rate limit), 504, a stream that times out after its 200; with `flood`, more long requests at
    once than the server admits (429 server_overloaded, 504s)."""
    lock = threading.Lock()
    auth = {"Authorization": f"Bearer {KEY}"}

    def record(r: httpx.Response) -> None:
        with lock:
            out.statuses.append(r.status_code)
            if r.status_code == 429:
                out.rejected[r.json()["error"]["code"]] += 1

    def slow(max_tokens: int = 200, key: str = SLOW_KEY) -> None:  # 200 tokens at 20 ms a step against a 1 s timeout
        record(httpx.post(server.url + "/complete", headers={"Authorization": f"Bearer {key}"}, timeout=30,
                          json={"code": long_prompt, "max_tokens": max_tokens, "temperature": 0}))

    def slow_stream() -> None:  # the same, streamed: 200 headers, then a timeout event
        with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {SLOW_KEY}"},
                          timeout=30, json={"model": "tiny-code", "prompt": long_prompt, "max_tokens": 200,
                                            "temperature": 0, "stream": True}) as r:
            r.read()
        record(r)
        events = [json.loads(line[len("data: "):]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        with lock:
            for e in events:
                if "error" in e:
                    out.stream_errors[e["error"]["code"]] += 1

    slow_threads = [threading.Thread(target=slow), threading.Thread(target=slow_stream)]
    for t in slow_threads:
        t.start()
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for body in ({"code": "def add(a, b):\n", "max_tokens": 4, "temperature": 0},
                     {"code": "def add(a, b):\n", "max_tokens": 4, "temperature": 0},  # the cache's
                     {"code": "import os\n", "max_tokens": 6, "temperature": 0.8}):
            record(c.post("/complete", headers=auth, json=body))
        record(c.post("/v1/completions", headers=auth, json={
            "model": "tiny-code", "prompt": "class Stack:\n", "suffix": "\n", "max_tokens": 5}))
        with c.stream("POST", "/v1/completions", headers=auth, json={
                "model": "tiny-code", "prompt": "for i in range(", "max_tokens": 5, "stream": True}) as r:
            r.read()
        record(r)
        record(c.post("/complete", json={"code": "x", "max_tokens": 2}))  # no key
        record(c.post("/complete", headers={"Authorization": f"Bearer {SLOW_KEY}"},
                      json={"code": "x", "max_tokens": -1}))
        for _ in range(16):  # bad input (400) until the hammer key's 20 a minute run out (429)
            record(c.post("/complete", headers={"Authorization": f"Bearer {HAMMER_KEY}"},
                          json={"code": "x", "max_tokens": -1}))
        record(c.get("/nothing-here"))
        for path in ("/health", "/ready", "/v1/models", "/stats"):
            record(c.get(path, headers=auth))
    for t in slow_threads:
        t.join()
    if flood:  # two more than the pod admits, each long enough to outlive the others' arrival
        flooders = [threading.Thread(target=slow, args=(200 - i, FLOOD_KEY)) for i in range(MAX_IN_FLIGHT + 2)]
        for t in flooders:
            t.start()
        for t in flooders:
            t.join()


@pytest.fixture(scope="module")
def traffic(server: ServerProcess, prometheus: PrometheusProcess, long_prompt: str) -> Traffic:
    """Three rounds with scrapes between them, so that every status's counter is seen growing (a
    labelled counter appears at its first increment, which rate() cannot see)."""
    out = Traffic()
    send_traffic(server, long_prompt, out, flood=True)
    time.sleep(2.5)
    send_traffic(server, long_prompt, out)
    time.sleep(2.5)
    send_traffic(server, long_prompt, out)
    for status in (200, 400, 401, 404, 429, 504):
        assert status in out.statuses, (status, out.statuses)
    # the clients saw both kinds of 429, and every slow stream ended in a timeout event
    assert out.rejected["rate_limit_exceeded"] > 0, out.rejected
    assert out.rejected["server_overloaded"] + out.rejected["queue_full"] > 0, out.rejected
    assert out.stream_errors == Counter(timeout=3), out.stream_errors
    return out


def exposed_series(server: ServerProcess) -> dict[str, set[str]]:
    """sample name -> its label names, from the server's own /metrics text."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def test_every_metric_and_label_used_is_exported(server: ServerProcess, traffic: Traffic) -> None:
    exposed = exposed_series(server)
    recs = records()
    record_labels = {name: parse_promql(expr).grouping_labels - {"le"} for name, expr in recs.items()}
    on_target = target_labels()
    assert {"namespace", "pod"} <= on_target
    seen: set[str] = set()
    for where, expr in every_expression():
        parsed = parse_promql(expr)
        available = set(on_target)
        for s in parsed.selectors:
            assert s.name, f"{where}: a selector without a metric name"
            if s.name in recs:
                labels = record_labels[s.name]
            elif s.name == "up":
                labels = set()
            else:
                assert s.name in exposed, f"{where}: {s.name} is not on /metrics"
                assert ":" not in s.name, f"{where}: {s.name} looks like a record but none is defined"
                labels = exposed[s.name]
                seen.add(s.name)
            for label in s.matchers:
                assert label in labels | on_target, f"{where}: {s.name} has no label {label!r}"
            available |= labels
        for label in parsed.grouping_labels:
            assert label in available, f"{where}: groups by {label!r}, which none of its series has"
    # the dashboard and the alerts together cover what the server exports for operators
    for family in ("code_completion_requests_total", "code_completion_duration_seconds_bucket",
                   "code_completion_time_to_first_token_seconds_bucket",
                   "code_completion_time_per_output_token_seconds_bucket",
                   "code_completion_queue_time_seconds_bucket", "code_completion_tokens_generated_total",
                   "code_completion_prompt_tokens_total", "code_completion_active_requests",
                   "code_completion_requests_running", "code_completion_requests_waiting",
                   "code_completion_kv_cache_usage_ratio", "gpu_memory_used_bytes", "model_loaded",
                   "code_completion_cache_hits_total", "code_completion_cache_misses_total",
                   "code_completion_cache_errors_total", "code_completion_ready",
                   "code_completion_max_in_flight_requests", "code_completion_rejections_total",
                   "code_completion_stream_errors_total", "code_completion_engine_decode_steps_total",
                   "code_completion_engine_decode_row_steps_total", "code_completion_engine_prefills_total",
                   "code_completion_engine_prefill_rows_total"):
        assert family in seen, f"{family} is exported but neither alerted on nor on the dashboard"


def test_prometheus_scrapes_evaluates_and_answers_the_dashboard(server: ServerProcess, prometheus: PrometheusProcess,
                                                                traffic: Traffic) -> None:
    prom = prometheus
    # discovery: prometheus.yml's relabelling kept our pod only, at the annotated port and path
    targets = prom.api("targets")
    active = [t for t in targets["activeTargets"] if t["labels"]["job"] == JOB]
    assert len(active) == 1 and len(targets["droppedTargets"]) == 3, targets
    assert active[0]["health"] == "up" and active[0]["scrapeUrl"] == f"{server.url}/metrics", active[0]
    assert active[0]["labels"] | {"instance": ""} == {"job": JOB, "namespace": NAMESPACE, "pod": POD,
                                                      "node": "node-a", "version": "1.0", "instance": ""}
    # rules: both groups loaded from the real alerts.yml, every rule evaluated without error
    groups = prom.api("rules")["groups"]
    loaded = [r for g in groups for r in g["rules"]]
    assert len(loaded) == len(rules()) and all(r["health"] == "ok" and not r.get("lastError") for r in loaded), \
        [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]

    def value(expr: str) -> float:
        got = prom.query(expr)
        assert len(got) == 1, (expr, got)
        return float(got[0]["value"][1])

    # the new series, once the last request's scrape is in: the live target is ready, admits
    # MAX_IN_FLIGHT, and counts every 429 the clients got under its reason and every stream
    # that timed out after its 200
    pod = f'job="{JOB}", namespace="{NAMESPACE}", pod="{POD}"'
    rejections = f"code_completion_rejections_total{{{pod}}}"
    wait_until(lambda: prom.query(f"sum({rejections}) == {sum(traffic.rejected.values())}")
               and prom.query(f'code_completion_stream_errors_total{{{pod}, code="timeout"}} == 3'),
               20, "the last round's 429s and stream errors scraped")
    by_reason = {r["metric"]["reason"]: float(r["value"][1]) for r in prom.query(rejections)}
    assert by_reason == {"rate_limit_exceeded": traffic.rejected["rate_limit_exceeded"],
                         "server_overloaded": traffic.rejected["server_overloaded"],
                         "queue_full": traffic.rejected["queue_full"]}, (by_reason, traffic.rejected)
    assert value(f'sum(code_completion_requests_total{{{pod}, status="429"}})') == sum(by_reason.values())
    assert value(f"code_completion_stream_errors_total{{{pod}}}") == 3  # the only code: timeout
    assert value(f"code_completion_ready{{{pod}}}") == 1
    assert value(f"code_completion_max_in_flight_requests{{{pod}}}") == MAX_IN_FLIGHT
    # the ratios, from the 504s, failed streams and 429s, once the records are evaluated on that data
    wait_until(lambda: prom.query("code_assistant:completion_errors:ratio_rate5m > 0")
               and prom.query("code_assistant:rate_limit_rejections:ratio_rate5m > 0")
               and prom.query("code_assistant:capacity_rejections:ratio_rate5m > 0"), 20, "non-zero ratios")
    for record in records():
        got = prom.query(record)
        assert got, f"{record} has no value"
        if record != "code_assistant:pods_ready:count":
            assert got[0]["metric"] == {"__name__": record, "job": JOB, "namespace": NAMESPACE}, got
    assert float(prom.query("code_assistant:pods_ready:count")[0]["value"][1]) == 1.0
    assert 0 <= value("code_assistant:in_flight_saturation:ratio_avg5m") <= 1
    assert float(prom.query("code_assistant:tokens_generated:rate5m")[0]["value"][1]) > 0
    # every dashboard query evaluates, and each finds data for this pod (the probe-failure panel
    # finds the /ready 503s that ServerProcess saw while the model loaded)
    for title, expr in dashboard_exprs():
        assert prom.query(grafana_substitute(expr)), f"panel {title!r}: no data for {grafana_substitute(expr)}"
    for name, (selector, label) in variable_queries().items():
        values = prom.api(f"label/{label}/values", **{"match[]": grafana_substitute(selector)})
        assert values == [{"namespace": NAMESPACE, "pod": POD}[name]], (name, values)
    # alerts: a healthy, reachable, loaded pod trips none of the availability alerts
    firing = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}
    assert not firing & {"CodeAssistantTargetDown", "CodeAssistantNoPodsReady", "CodeAssistantModelNotLoaded",
                         "CodeAssistantProbesFailing"}, firing
