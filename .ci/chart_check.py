#!/usr/bin/env python3
"""Renders, lints and validates helm/pcpd without a cluster, and feeds the
rendered pcpd configuration to `pcpd check-config`.

usage: chart_check.py PCPD_BINARY

Uses the real Helm library (PyPI helm-python-sdk) and the Kubernetes API
schemas (kubernetes-validate). Exit status 0 only when every
helm/pcpd/ci/*-values.yaml renders, lints clean, validates, and pcpd accepts
the configuration; and when bad values are refused.
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "helm", "pcpd")
KUBE_VERSION = "1.30.0"
# Custom resources of the Prometheus Operator: no schema in
# kubernetes-validate; checked for shape here.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL", msg)


def check_config(pcpd, config_text, secret, where):
    with tempfile.TemporaryDirectory() as tmp:
        # The pod mounts the Secret at /etc/pcpd/secret; give check-config
        # the same files in a temporary directory.
        sec = os.path.join(tmp, "secret")
        os.makedirs(sec)
        files = {"tls.crt": "x", "tls.key": "x", "ca.crt": "x", "tokens.yaml": "[]\n"}
        if secret:
            files.update(secret.get("stringData") or {})
        for name, text in files.items():
            with open(os.path.join(sec, name), "w") as f:
                f.write(text)
        cfg = config_text.replace("/etc/pcpd/secret", sec)
        path = os.path.join(tmp, "pcpd.yaml")
        with open(path, "w") as f:
            f.write(cfg)
        out = subprocess.run([pcpd, "check-config", path], capture_output=True, text=True)
        if "built without cluster mode" in out.stdout + out.stderr:
            fail(f"{where}: this pcpd lacks the cluster feature: build the tests with "
                 "--features pcpd/cluster (the README's test command does)")
        elif out.returncode != 0:
            fail(f"{where}: pcpd check-config refused the rendered config:\n{out.stdout}{out.stderr}\n{cfg}")
        else:
            print(f"ok   {where}: pcpd check-config: {out.stdout.strip()}")


def check_dashboard(doc, where):
    """The dashboard ConfigMap: the sidecar's label, and the shipped JSON."""
    with open(os.path.join(CHART, "dashboards", "pcpd.json")) as f:
        shipped = json.load(f)
    if doc["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
        fail(f"{where}: no grafana_dashboard: \"1\" label for the sidecar")
    elif json.loads(doc["data"]["pcpd.json"]) != shipped:
        fail(f"{where}: the dashboard differs from dashboards/pcpd.json")
    else:
        print(f"ok   {where}: the dashboard, labelled for Grafana's sidecar")


def main():
    pcpd = sys.argv[1]
    chart = helm.Chart.load(CHART)
    values_files = sorted(glob.glob(os.path.join(CHART, "ci", "*-values.yaml")))
    if not values_files:
        fail("no ci/*-values.yaml")
    for vf in values_files:
        name = os.path.basename(vf)
        with open(vf) as f:
            values = yaml.safe_load(f) or {}
        report = helm.lint(CHART, values, strict=True, kube_version="v" + KUBE_VERSION)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        problems += report.get("errors") or []
        if problems:
            fail(f"{name}: helm lint: {problems}")
        else:
            print(f"ok   {name}: helm lint (strict)")
        manifests = chart.render(values, name="pcpd", namespace="cgnat", is_install=True)
        docs = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                if "pcpd" not in text:
                    fail(f"{name}: NOTES.txt is empty")
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    docs.append((path, doc))
        kinds = sorted({d["kind"] for _, d in docs})
        print(f"     {name}: rendered {len(docs)} objects: {', '.join(kinds)}")
        config, secret = None, None
        for path, doc in docs:
            where = f"{name}: {path}: {doc['kind']}/{doc['metadata']['name']}"
            if doc["kind"] in CRD_KINDS:
                if not doc.get("spec") or not doc["apiVersion"].startswith("monitoring.coreos.com/"):
                    fail(f"{where}: not a Prometheus Operator object")
                continue
            try:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
            if doc["kind"] == "ConfigMap" and "pcpd.yaml" in doc["data"]:
                config = doc["data"]["pcpd.yaml"]
            if doc["kind"] == "ConfigMap" and "pcpd.json" in doc["data"]:
                check_dashboard(doc, where)
            if doc["kind"] == "Secret":
                secret = doc
        print(f"ok   {name}: Kubernetes {KUBE_VERSION} schemas (strict)")
        if config is None:
            fail(f"{name}: no ConfigMap with pcpd.yaml")
        else:
            check_config(pcpd, config, secret, name)

    # Bad values are refused before anything reaches a cluster.
    for bad, expect in [
        ({"mode": "statefulsets"}, "mode"),
        ({"dataplane": {"backend": "iptables"}}, "backend"),
        # A NAT class must name its pool; only a firewall class has none.
        ({"pcp": {"subscribers": [{"prefixes": ["100.64.0.0/10"], "profile": "residential"}]}}, "pool"),
        ({"dataplane": {"firewall": {"unsolicited": "reject"}}}, "unsolicited"),
        ({"log": {"natSinks": [{"type": "kafka"}]}}, "natSinks"),
        ({"secret": {"tokens": [{"name": "x", "sha256": "short", "scope": "write"}]}}, "sha256"),
        ({"secret": {"tokens": []}}, "tlsCrt"),
        ({"cluster": {"enabled": True, "partitions": [{"name": "p", "subscribers": ["100.64.0.0/10"],
                                                       "pool": "default", "external": ["192.0.2.0/24"]}]}},
         "cluster.etcd.endpoints"),
    ]:
        try:
            chart.render(bad, name="pcpd", namespace="cgnat", is_install=True)
            fail(f"values {bad} rendered; expected a refusal naming {expect}")
        except helm.HelmError as e:
            if expect not in str(e):
                fail(f"values {bad}: refusal does not name {expect}: {e}")
            else:
                print(f"ok   bad values {bad} refused: {str(e).splitlines()[0][:120]}")

    if failures:
        print(f"{len(failures)} chart problem(s)")
        sys.exit(1)
    print("chart: all checks passed")


if __name__ == "__main__":
    main()
