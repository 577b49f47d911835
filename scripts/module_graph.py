"""Print the package-level import graph of shim, legacy and adapters as a Markdown
table of edges (docs/architecture.md is made with it).

    .venv/bin/python scripts/module_graph.py            # this checkout
    .venv/bin/python scripts/module_graph.py OTHER_DIR  # another checkout (e.g. a worktree of an older commit)

A package is a subpackage of `shim` (shim.core, shim.app, ...), or `shim` for the
modules directly in it, `legacy` or `adapters`. Each edge counts the module-level
imports from one package into another; `cycle` marks pairs importing each other.
Uses grimp, which import-linter installs.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import grimp

ROOTS = ("shim", "legacy", "adapters")


def package_of(module: str, packages: set[str]) -> str:
    parts = module.split(".")
    if parts[0] == "shim" and len(parts) > 1 and f"shim.{parts[1]}" in packages:
        return f"shim.{parts[1]}"
    return parts[0]


def edges(checkout: Path) -> Counter[tuple[str, str]]:
    sys.path.insert(0, str(checkout.resolve()))
    graph = grimp.build_graph(*ROOTS, cache_dir=None)
    # Subpackages of shim: the modules that have children.
    packages = {m for m in graph.modules if m.count(".") == 1 and graph.find_children(m)}
    found: Counter[tuple[str, str]] = Counter()
    for importer in graph.modules:
        for imported in graph.find_modules_directly_imported_by(importer):
            a, b = package_of(importer, packages), package_of(imported, packages)
            if a != b:
                found[(a, b)] += 1
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", nargs="?", default=".", type=Path)
    found = edges(parser.parse_args().checkout)
    print("| importer | imported | imports | |")
    print("|---|---|---|---|")
    for (a, b), count in sorted(found.items()):
        cycle = "cycle" if (b, a) in found else ""
        print(f"| `{a}` | `{b}` | {count} | {cycle} |")


if __name__ == "__main__":
    main()
