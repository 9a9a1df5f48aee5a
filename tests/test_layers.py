"""The layers hold: the domain loads no RPC, protobuf, MQTT or metrics library; the
services never import the load generator; no module imports itself back through others
(every import counts, top-level or inside a function)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("services", "loadgen")
FORBIDDEN_IN_DOMAIN = ("grpc", "google.protobuf", "tlbsim", "aiomqtt", "prometheus_client")


def loaded_by(*modules: str) -> list[str]:
    """Every module a fresh interpreter has loaded after importing `modules`."""
    code = (f"import sys\nfor m in {list(modules)!r}: __import__(m)\n"
            "import json; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return json.loads(out)


def test_the_domain_loads_no_rpc_protobuf_mqtt_or_metrics():
    loaded = loaded_by("services.memory.kernel", "services.cpu.core", "services.common.cohost",
                       "services.machine")
    assert "services.memory.kernel" in loaded and "services.cpu.core" in loaded
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".")
                                    for f in FORBIDDEN_IN_DOMAIN)]
    assert bad == []


def test_serving_loads_neither_the_load_generator_nor_rich():
    """`python -m services serve ...` parses only serve: a service process does not pay
    for the load generator."""
    loaded = loaded_by("services.cli", "services.cpu.service", "services.memory.service",
                       "services.coordinator.service")
    assert [m for m in loaded if m.split(".")[0] in ("loadgen", "rich", "matplotlib")] == []


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules `path` imports (`from a.b import c` is a.b.c if that is a
    module, else a.b); a package's own __init__ is not counted for its submodules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def test_services_never_import_the_load_generator():
    upward = {name: sorted(m for m in deps if m.startswith("loadgen"))
              for name, deps in graph().items() if name.startswith("services")}
    assert {k: v for k, v in upward.items() if v} == {}


def test_no_import_cycle():
    g = graph()
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(g[node]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert cycles == []
