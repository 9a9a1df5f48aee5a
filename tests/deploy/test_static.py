"""Static checks of the deployment files (point 1 of issue 7): the compose file against
the Compose specification's JSON schema (vendored by check-jsonschema, offline), every
command through tlbsim's own parser, every referenced path, Prometheus's targets, the
Dockerfile's dependencies, and the Kubernetes manifests against the Kubernetes schemas
(kubernetes-validate, offline), alone and composed by the kustomization."""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import tomllib

import kubernetes_validate
import pytest
import yaml

from loadgen.cli.main import build_parser
from tests.deploy.stack import (COMPOSE, K8S, MORE_CPUS, ROOT, compose,
                                dockerfile_instructions, exec_form, image_env, merged_compose,
                                runtime_stage, start_order)

PROM_COMPOSE = ROOT / "deploy" / "prometheus" / "prometheus-compose.yml"
K8S_VERSION = "1.32.0"  # pod-index label needs >= 1.28; native gRPC probes >= 1.27
KNOWN_IMAGES = ("tlbsim:", "eclipse-mosquitto:", "prom/prometheus:", "grafana/grafana:")


def services() -> dict[str, dict]:
    return compose()["services"]


def tlbsim_services(svcs: dict[str, dict] | None = None) -> dict[str, dict]:
    svcs = services() if svcs is None else svcs
    return {n: s for n, s in svcs.items() if s.get("image", "").startswith("tlbsim:")}


# --- the compose file ----------------------------------------------------------------------
@pytest.mark.parametrize("path", [COMPOSE, MORE_CPUS], ids=lambda p: p.name)
def test_compose_file_is_valid_against_the_compose_spec_schema(path):
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                        "vendor.compose-spec", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_check_rejects_a_broken_compose_file(tmp_path):
    """The schema check can fail: a misspelt key is refused."""
    bad = copy.deepcopy(compose())
    bad["services"]["cpu0"]["depends_on"]["memory"]["condition"] = "service_heathy"
    f = tmp_path / "docker-compose.yml"
    f.write_text(yaml.safe_dump(bad))
    r = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema",
                        "vendor.compose-spec", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0


def test_compose_defines_the_cluster():
    svcs = services()
    assert {"memory", "coordinator", "cpu0", "cpu1", "cpu2", "cpu3", "mosquitto",
            "prometheus", "grafana", "loadgen"} <= set(svcs)
    assert svcs["loadgen"]["profiles"] == ["load"]
    for name, svc in svcs.items():
        assert svc["image"].startswith(KNOWN_IMAGES), name
        assert ":latest" not in svc["image"], name
        if name != "loadgen":
            assert svc.get("restart") == "unless-stopped", name
            assert svc["healthcheck"]["test"][0] == "CMD", name


def test_every_tlbsim_command_is_a_real_subcommand_with_real_flags(monkeypatch):
    """Each tlbsim service's argv (entrypoint + command) parses with tlbsim's own parser,
    and every TLBSIM_* variable it sets is read by that parser."""
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint == ["tlbsim"]
    svcs = {**tlbsim_services(), **tlbsim_services(compose(MORE_CPUS)["services"])}
    assert len(svcs) >= 11
    for name, svc in svcs.items():
        argv = svc.get("entrypoint", entrypoint) + svc["command"]
        assert argv[0] == "tlbsim", name
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        for k in list(__import__("os").environ):
            if k.startswith("TLBSIM_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{' '.join(argv)}` does not parse")
        for k in env:  # each variable changes what the parser sees
            monkeypatch.delenv(k)
            without = build_parser().parse_args(argv[1:])
            monkeypatch.setenv(k, env[k])
            assert vars(without) != vars(args), f"{name}: {k} is not a tlbsim setting"
        if args.command == "serve" and args.service == "cpu":
            assert int(args.id) == int(name.removeprefix("cpu")), name
            assert args.advertise == f"{name}:50051"
            assert args.memory and args.coordinator


def test_cpus_register_themselves_no_static_cpu_list():
    """Nothing but the CPUs' own services names a CPU: no --cpus list in a server's
    command or environment (Prometheus finds them by the `cpus` alias)."""
    svcs = services()
    for name, svc in tlbsim_services().items():
        if name.startswith("cpu"):
            assert "cpus" in svc["networks"]["default"]["aliases"]
            continue
        text = yaml.safe_dump({k: svc.get(k) for k in ("command", "environment")})
        assert not re.search(r"\bcpu\d", text), (name, text)
    assert "cpu0" not in PROM_COMPOSE.read_text()
    assert {n for n in svcs if re.fullmatch(r"cpu\d+", n)} == {"cpu0", "cpu1", "cpu2", "cpu3"}


def test_more_cpus_override_adds_distinct_cpu_ids():
    merged = merged_compose(COMPOSE, MORE_CPUS)["services"]
    ids = [int(s["environment"]["TLBSIM_CPU_ID"]) for n, s in merged.items()
           if n.startswith("cpu")]
    assert sorted(ids) == list(range(8))
    for name, svc in compose(MORE_CPUS)["services"].items():
        assert svc["environment"]["TLBSIM_ADVERTISE"] == f"{name}:50051"
        assert set(svc["depends_on"]) <= set(merged)


def test_depends_on_healthy_services_and_start_order():
    svcs = services()
    order = start_order(svcs)
    assert order.index("coordinator") < order.index("memory") < order.index("cpu0")
    for name, svc in svcs.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in svcs, (name, dep)
            assert cond["condition"] in ("service_healthy", "service_started"), (name, dep)
            if cond["condition"] == "service_healthy":
                assert not svcs[dep].get("healthcheck", {}).get("disable"), (name, dep)
    for name in ("memory", "cpu0", "cpu3", "loadgen", "grafana"):
        conds = {c["condition"] for c in svcs[name]["depends_on"].values()}
        assert conds == {"service_healthy"}, name


def test_only_grafana_and_prometheus_publish_ports():
    published = {n: s["ports"] for n, s in services().items() if s.get("ports")}
    assert published == {"grafana": ["3000:3000"], "prometheus": ["9090:9090"]}


def test_container_ports_agree():
    """The gRPC port the services listen on is the one the health checks probe and the
    one other services are given; metrics on 9100, the broker on its listener port."""
    svcs = services()
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    broker_port = re.search(r"^listener (\d+)", conf, re.M).group(1)
    assert exec_form("HEALTHCHECK")[-1].endswith(":50051")
    assert image_env()["TLBSIM_LISTEN"] == "0.0.0.0:50051"
    assert image_env()["TLBSIM_METRICS_PORT"] == "9100"
    for name, svc in tlbsim_services().items():
        env = svc.get("environment", {})
        if name != "loadgen":
            assert env["TLBSIM_LISTEN"] == "0.0.0.0:50051", name
            assert env["TLBSIM_METRICS_PORT"] == "9100", name
            assert svc["healthcheck"]["test"][1:] == exec_form("HEALTHCHECK"), name
        for var in ("TLBSIM_MEMORY", "TLBSIM_COORDINATOR", "TLBSIM_CLUSTER", "TLBSIM_ADVERTISE"):
            if var in env:
                host, port = env[var].rsplit(":", 1)
                assert host in svcs and port == "50051", (name, var)
        if "TLBSIM_MQTT_URL" in env:
            assert env["TLBSIM_MQTT_URL"] == f"mqtt://mosquitto:{broker_port}", name


def test_every_volume_path_and_config_file_exists():
    svcs = services()
    mounts: dict[str, dict[str, str]] = {}
    for name, svc in svcs.items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            assert src.startswith("./"), (name, vol)  # bind mounts from the repository only
            assert (ROOT / src).exists(), (name, src)
            mounts.setdefault(name, {})[dst] = src

    def host_path(name: str, container_path: str):
        for dst, src in mounts[name].items():
            if container_path == dst or container_path.startswith(dst + "/"):
                return ROOT / src / container_path[len(dst):].lstrip("/")
        raise AssertionError(f"{name}: {container_path} is not mounted")

    assert mounts["mosquitto"]["/mosquitto/config/mosquitto.conf"].endswith("mosquitto.conf")
    config = [a for a in svcs["prometheus"]["command"] if a.startswith("--config.file=")]
    prom = host_path("prometheus", config[0].split("=", 1)[1])
    assert prom == PROM_COMPOSE and prom.is_file()
    for rule in yaml.safe_load(prom.read_text())["rule_files"]:
        assert (prom.parent / rule).is_file(), rule
    home = svcs["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path("grafana", home).name == "tlbsim-overview.json"
    assert host_path("grafana", home).is_file()
    # the dashboards provider reads the folder compose mounts the dashboards at
    provider = yaml.safe_load(host_path(
        "grafana", "/etc/grafana/provisioning/dashboards/tlbsim.yml").read_text())
    assert provider["providers"][0]["options"]["path"] in mounts["grafana"]
    assert svcs["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert svcs["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    # the datasource points at the compose Prometheus
    ds = yaml.safe_load(host_path(
        "grafana", "/etc/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


def test_prometheus_compose_config_scrapes_every_service():
    svcs = services()
    conf = yaml.safe_load(PROM_COMPOSE.read_text())
    static, dns = set(), set()
    for job in conf["scrape_configs"]:
        for sc in job.get("static_configs", []):
            static |= set(sc["targets"])
        for sd in job.get("dns_sd_configs", []):
            dns |= {f"{n}:{sd['port']}" for n in sd["names"]}
    scraped = set()
    for name, svc in svcs.items():
        if "profiles" in svc:
            continue  # loadgen: a one-shot client, nothing to scrape
        if svc["image"].startswith("tlbsim:"):
            port = svc["environment"]["TLBSIM_METRICS_PORT"]
            aliases = svc.get("networks", {}).get("default", {}).get("aliases", [])
            assert (f"{name}:{port}" in static
                    or any(f"{a}:{port}" in dns for a in aliases)), name
            scraped.add(name)
    assert {"grafana:3000", "localhost:9090"} <= static
    scraped |= {"grafana", "prometheus"}
    # mosquitto has no metrics endpoint; everything else is scraped
    assert set(svcs) - scraped - {"loadgen"} == {"mosquitto"}
    # the same job and labels as prometheus.yml, so rules and dashboards work unchanged
    tl = next(j for j in conf["scrape_configs"] if j["job_name"] == "tlbsim")
    assert {sc["labels"]["service"] for sc in tl["static_configs"]} == {"coordinator", "memory"}
    assert tl["relabel_configs"][0]["replacement"] == "cpu"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool")
def test_promtool_accepts_the_compose_prometheus_config():
    r = subprocess.run(["promtool", "check", "config", str(PROM_COMPOSE)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the Dockerfile ------------------------------------------------------------------------
def test_dockerfile_installs_exactly_the_pinned_dependencies(tmp_path):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"]
    assert deps and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", d) for d in deps), deps
    runs = [rest for k, rest in dockerfile_instructions() if k == "RUN"]
    pip = [m.strip() for r in runs for m in re.findall(r"pip install ([^&|;]*)", r)]
    assert pip == ["--prefix=/install --requirement requirements.txt",
                   "--prefix=/install --no-deps ."], pip
    # run the Dockerfile's own requirements step on pyproject.toml and compare
    step = next(r for r in runs if "requirements.txt" in r and "tomllib" in r)
    cmd = step.split(">", 1)[0].strip()
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    r = subprocess.run(["sh", "-c", cmd.replace("python ", f"{sys.executable} ", 1)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == deps


def test_dockerfile_runtime_stage():
    instrs = dockerfile_instructions()
    froms = [rest for k, rest in instrs if k == "FROM"]
    assert all(f.startswith("python:3.11-slim") for f in froms), froms
    stage = runtime_stage()
    user = [rest for k, rest in stage if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")
    assert exec_form("ENTRYPOINT") == ["tlbsim"]
    assert "tlbsim" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    hc = exec_form("HEALTHCHECK")
    assert hc[:3] == ["python", "-m", "services.common.healthcheck"]
    # every COPY source exists and .dockerignore does not hide it
    ignored = [l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")]
    for k, rest in instrs:
        if k == "COPY" and "--from" not in rest:
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") not in ignored, src


# --- Kubernetes ----------------------------------------------------------------------------
def k8s_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def validate_all(docs: list[dict]) -> None:
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e.message} at {e.path}")


def test_every_manifest_validates_against_the_kubernetes_schemas():
    files = kustomization()["resources"]
    assert sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml") \
        == sorted(files)
    for f in files:
        validate_all(k8s_docs((K8S / f).read_text()))


def test_kubernetes_validation_can_fail():
    doc = k8s_docs((K8S / "cpu.yaml").read_text())[0]
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def composed() -> list[dict]:
    """The kustomization applied the way kustomize does for what it uses: resources,
    namespace, labels (not on selectors) and the image override."""
    k = kustomization()
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in k["images"]}
    out = []
    for f in k["resources"]:
        for doc in k8s_docs((K8S / f).read_text()):
            doc = copy.deepcopy(doc)
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = k["namespace"]
            for lab in k.get("labels", []):
                doc["metadata"].setdefault("labels", {}).update(lab["pairs"])
                if lab.get("includeTemplates") or lab.get("includeSelectors"):
                    raise AssertionError("extend composed() for template labels")
            for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                c["image"] = images.get(c["image"], c["image"])
            out.append(doc)
    return out


def test_kustomize_composition_validates():
    docs = composed()
    validate_all(docs)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("Deployment", "memory"), ("Deployment", "coordinator"), ("Service", "memory"),
            ("Service", "coordinator"), ("StatefulSet", "cpu"), ("Service", "cpu"),
            ("Deployment", "mosquitto"), ("Service", "mosquitto")} <= names
    assert all(d["metadata"].get("namespace") == "tlbsim" for d in docs
               if d["kind"] != "Namespace")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (kustomize)")
def test_kubectl_kustomize_output_validates_and_matches():
    r = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    docs = k8s_docs(r.stdout)
    validate_all(docs)
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, docs)) == sorted(map(key, composed()))
    ours = {key(d): d for d in composed()}
    for d in docs:
        assert d == ours[key(d)], key(d)


def test_k8s_workloads():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in composed()}
    svc_cpu = docs[("Service", "cpu")]
    assert svc_cpu["spec"]["clusterIP"] == "None"
    sts = docs[("StatefulSet", "cpu")]
    assert sts["spec"]["serviceName"] == "cpu"
    for kind, name in (("Deployment", "memory"), ("Deployment", "coordinator"),
                       ("StatefulSet", "cpu")):
        pod = docs[(kind, name)]["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["terminationGracePeriodSeconds"] >= 5
        c = spec["containers"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["grpc"]["port"] == 50051, (name, probe)
        assert c["resources"]["requests"] and c["resources"]["limits"], name
        env = {e["name"]: e for e in c["env"]}
        # the args and every literal TLBSIM_* value parse with tlbsim's own parser
        argv = c["args"]
        args = build_parser().parse_args(argv)
        assert args.command == "serve" and args.service == name
        for var, e in env.items():
            if var.startswith("TLBSIM_") and "value" in e:
                flag = {"TLBSIM_MQTT_URL": "--mqtt-url", "TLBSIM_METRICS_PORT": "--metrics-port",
                        "TLBSIM_CPU_ID": "--id"}.get(var, "--" + var[7:].lower())
                build_parser().parse_args(argv + [flag, e["value"].replace("$(POD_IP)", "10.0.0.1")])
    cpu_env = {e["name"]: e for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert cpu_env["TLBSIM_CPU_ID"]["valueFrom"]["fieldRef"]["fieldPath"] \
        == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert cpu_env["TLBSIM_ADVERTISE"]["value"] == "$(POD_IP):50051"
    names = list(cpu_env)
    assert names.index("POD_IP") < names.index("TLBSIM_ADVERTISE")  # $(VAR) needs it first


def test_k8s_mosquitto_config_is_the_compose_one():
    cm = next(d for d in composed() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mosquitto")
    assert cm["data"]["mosquitto.conf"] == (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
