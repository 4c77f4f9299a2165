"""The static half of the layering contract, checked by `make lint`: the import-linter contracts in pyproject.toml.

grimp finds a package's modules by walking its folder, and `[tool.setuptools] package-dir` keeps
`datacredit.jobs` and `datacredit.operator` outside datacredit/ (in jobs/ and operator/), so lint-imports run on a
checkout or an editable install would not see them ("Module 'datacredit.operator' does not exist"). This script
lays the package out as a wheel installs it, in a temporary folder of links, and runs lint-imports from there
(that folder goes first on its sys.path; from the repo root ./operator would also shadow the stdlib's).

It also checks that the core contract lists every core module (`check_layers.core_modules`), so a new module is
not left out. Extra arguments go to lint-imports (e.g. --verbose). Exit status 1 when a contract is broken.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from check_layers import ROOT, core_modules


def lay_out(package_dir: dict[str, str], dest: Path) -> None:
    """Under `dest`, a folder per package of `package_dir` linking each entry of its source folder, except the
    subpackages that package-dir maps elsewhere."""
    for name in sorted(package_dir, key=lambda n: n.count(".")):  # parents first
        folder = dest.joinpath(*name.split("."))
        folder.mkdir()
        mapped = {n.rpartition(".")[2] for n in package_dir if n.rpartition(".")[0] == name}
        for entry in (ROOT / package_dir[name]).iterdir():
            if entry.name not in mapped and entry.name != "__pycache__":
                (folder / entry.name).symlink_to(entry)


def missing_core_modules(contract: dict) -> list[str]:
    """Core modules the contract's source_modules do not name (`pkg.*` names pkg's modules)."""
    sources = set(contract["source_modules"])
    return [m for m in core_modules() if m not in sources and m.rpartition(".")[0] + ".*" not in sources]


def main(args: list[str]) -> int:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = next(c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == "core")
    missing = missing_core_modules(core)
    for module in missing:
        print(f"layering: {module} is missing from the core contract's source_modules (pyproject.toml)",
              file=sys.stderr)
    lint_imports = Path(sys.executable).with_name("lint-imports")  # the dev extra's, beside this interpreter
    with tempfile.TemporaryDirectory(prefix="datacredit-layers-") as tmp:
        lay_out(config["tool"]["setuptools"]["package-dir"], Path(tmp))
        rc = subprocess.run([str(lint_imports), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml"), *args],
                            cwd=tmp).returncode
    return 1 if missing or rc else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
