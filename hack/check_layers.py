"""The layering contract, checked by `make lint`: the core stays light and the control plane stays off the GPU.

This is the import-time half (what a module loads, so a lazy import inside a function is fine for the core); the
static half, every import statement wherever it is, is import-linter's (pyproject.toml, hack/lint_imports.py).

1. Importing any core module (`datacredit.*`, not the entry points `cli`, `cli_runs`, `local`, `demo`) loads
   neither torch, kopf, kubernetes, `datacredit.jobs` nor `datacredit.operator` (each module is imported in a
   fresh interpreter).
2. No module of `operator/` imports `datacredit.jobs` or torch, not even inside a function (read from the source).

Exit status 1 lists every breach with the module and what it pulled in.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "kopf", "kubernetes", "datacredit.jobs", "datacredit.operator")
ENTRY_POINTS = {"cli", "cli_runs", "local", "demo"}  # they start GPU work or the operator on purpose (lazily)
GPU = ("datacredit.jobs", "torch", "diffusers", "torch_pruning", "peft")

PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(" ".join(m for m in {heavy!r} if m in sys.modules))
"""


def core_modules() -> list[str]:
    """Every module of the core package (datacredit/ without the jobs and operator links)."""
    out = []
    for path in sorted((ROOT / "datacredit").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[1] in ("jobs", "operator") or (len(rel.parts) == 2 and rel.name in ENTRY_POINTS):
            continue
        out.append(".".join(p for p in rel.parts if p != "__init__"))
    return out


def _probe(modules: list[str]) -> tuple[bool, str]:
    """(imported fine, heavy modules loaded) after importing `modules` in a fresh interpreter."""
    probe = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *modules], capture_output=True,
                           text=True, cwd=ROOT / "tests")  # not the repo root: ./operator would shadow the stdlib
    if probe.returncode != 0:
        return False, (probe.stderr.strip().splitlines() or ["?"])[-1]
    return True, probe.stdout.strip()


def core_breaches() -> list[str]:
    """Core modules whose import loads something heavy: all at once, then one by one to name the culprits."""
    modules = core_modules()
    ok, heavy = _probe(modules)
    if ok and not heavy:
        return []
    breaches = []
    for module in modules:
        ok, heavy = _probe([module])
        if not ok:
            breaches.append(f"{module}: import failed: {heavy}")
        elif heavy:
            breaches.append(f"{module} imports {heavy}")
    return breaches


def operator_breaches() -> list[str]:
    """Imports of GPU workloads anywhere in operator/*.py."""
    breaches = []
    for path in sorted((ROOT / "operator").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if any(name == g or name.startswith(g + ".") for g in GPU):
                    breaches.append(f"operator/{path.name}:{node.lineno} imports {name}")
    return breaches


def main() -> int:
    breaches = core_breaches() + operator_breaches()
    for line in breaches:
        print(f"layering: {line}", file=sys.stderr)
    print(f"layering: {len(core_modules())} core modules and operator/ checked, {len(breaches)} breach(es)")
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
