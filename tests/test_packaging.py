"""Packaging promises: import names, extras without torch, generated code in step with the proto."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP_FOLDERS = {"client": "protoserve.client", "server": "protoserve.server", "translator": "protoserve.translator"}


def _modules_after_import(module: str) -> set[str]:
    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(result.stdout.split())


def test_client_imports_no_torch_nor_aiohttp() -> None:
    loaded = _modules_after_import("protoserve.client")
    assert "torch" not in loaded
    assert "transformers" not in loaded
    assert "aiohttp" not in loaded


def test_translator_imports_no_torch() -> None:
    loaded = _modules_after_import("protoserve.translator")
    assert "torch" not in loaded
    assert "transformers" not in loaded


def test_cli_entry_point_imports_no_torch() -> None:
    loaded = _modules_after_import("protoserve.client.cli.main")
    assert "torch" not in loaded


def test_generated_code_is_not_stale() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_proto
    finally:
        sys.path.pop(0)
    assert gen_proto.stale_files() == [], "run: python scripts/gen_proto.py"


def _declared() -> tuple[dict[str, str], set[str]]:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return setuptools["package-dir"], set(setuptools["packages"])


def test_every_package_folder_is_declared() -> None:
    package_dir, packages = _declared()
    found = {"protoserve.v1"}
    for folder, name in TOP_FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            if relative.parts[:1] == ("v1",):
                continue
            found.add(".".join([name, *relative.parts]))
    assert found == packages, f"missing from pyproject: {found - packages}; stale: {packages - found}"
    for name, folder in package_dir.items():
        assert (ROOT / folder / "__init__.py").exists(), name


def test_no_bare_top_level_package_names() -> None:
    for path in [*ROOT.glob("client/**/*.py"), *ROOT.glob("server/**/*.py"), *ROOT.glob("translator/**/*.py")]:
        text = path.read_text()
        bad = re.findall(r"^\s*(?:from|import) (server|translator|client)\b", text, flags=re.MULTILINE)
        assert not bad, f"{path} imports a bare top-level package: {bad}"


def test_every_proto_field_and_rpc_is_commented() -> None:
    declaration = re.compile(
        r"^\s*(?:(?:optional|repeated)\s+)?(?:map<[^>]+>|[\w.]+)\s+\w+\s*=\s*\d+;|^\s*rpc\s|^\s*(?:message|enum|service)\s"
    )
    for proto in (ROOT / "proto").rglob("*.proto"):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            if declaration.match(line) and not line.strip().startswith("//"):
                previous = lines[number - 1].strip() if number else ""
                assert previous.startswith("//"), f"{proto.name}:{number + 1} has no comment: {line.strip()}"
