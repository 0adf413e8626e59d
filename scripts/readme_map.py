"""Rewrite the README's map of the code from the modules' own docstrings.

    python scripts/readme_map.py           # rewrite the section between the markers
    python scripts/readme_map.py --check   # exit 1 if the README's map is stale

One line per module: its path and the first sentence of its docstring. The map sits between
`<!-- map:start -->` and `<!-- map:end -->`; tests/test_readme.py fails when it is stale, so the
map stays true as the code moves.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
START, END = "<!-- map:start -->", "<!-- map:end -->"
FOLDERS = {
    "proto": "the `.proto` files: the single source of truth of the API (`protoserve.v1`)",
    "client": "`protoserve.client`: generated stubs (`client/v1/`, imported as `protoserve.v1`), typed client, CLI",
    "server": (
        "`protoserve.server`: gRPC services, model loading and the engine (its C++ CPU kernels in"
        " `server/engine/csrc/`); the only part that imports torch"
    ),
    "translator": "`protoserve.translator`: the aiohttp OpenAI-compatible layer; never imports torch",
    "scripts": "code generation, benchmarks, report and map writers, the container entrypoint",
    "tests": "unit, integration, end-to-end and reliability tests (`make test`; long ones `make soak`)",
    "deploy": "Kubernetes manifests: kustomize base (server + translator sidecar) and a GPU overlay",
    "docs": "longer guides: deploying, agents and tools",
}


def first_sentence(docstring: str) -> str:
    """The docstring's first sentence (its first paragraph, up to the first full stop)."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", paragraph)
    sentence = paragraph[: match.start() + 1] if match else paragraph
    return sentence.rstrip(":")


def module_lines(folder: str) -> list[str]:
    lines = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[:2] == ("client", "v1") or path.name == "__main__.py":
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not docstring.strip():
            raise SystemExit(f"{relative} has no module docstring: add one, the README map is made from it")
        lines.append(f"- `{relative}`: {first_sentence(docstring)}")
    return lines


def render() -> str:
    parts = [START, "", "Folders:", ""]
    parts += [f"- `{name}/`: {text}" for name, text in FOLDERS.items()]
    for folder in ("client", "server", "translator", "scripts"):
        parts += ["", f"`{folder}/`:", "", *module_lines(folder)]
    parts += ["", END]
    return "\n".join(parts)


def rewritten(readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return head + render() + tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether the map is stale")
    args = parser.parse_args()
    current = README.read_text()
    fresh = rewritten(current)
    if args.check:
        if fresh != current:
            print("README.md's map of the code is stale: run python scripts/readme_map.py")
            return 1
        print("README.md's map of the code is up to date")
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
