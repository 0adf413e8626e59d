"""Regenerate the Python code of the v1 API from proto/ into client/v1/.

    python scripts/gen_proto.py            # write client/v1/
    python scripts/gen_proto.py --check    # exit 1 if client/v1/ is stale

The modules are named after the proto files (`protoserve/v1/common.proto` becomes
`protoserve.v1.common_pb2`), so the imports protoc writes between them resolve inside
the installed `protoserve.v1` package, which lives in the client folder.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO_PACKAGE = Path("protoserve") / "v1"
TARGET = ROOT / "client" / "v1"
INIT_TEXT = '"""Generated protobuf and gRPC code of the protoserve v1 API (scripts/gen_proto.py)."""\n'


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over proto/protoserve/v1/*.proto; return the generated files in out_dir."""
    protos = sorted((PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--pyi_out={scratch}",
            *[str(p) for p in protos],
        ]
        subprocess.run(command, check=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((Path(scratch) / PROTO_PACKAGE).iterdir()):
            shutil.copyfile(produced, out_dir / produced.name)
            written.append(out_dir / produced.name)
    (out_dir / "__init__.py").write_text(INIT_TEXT)
    return [*written, out_dir / "__init__.py"]


def stale_files(target: Path = TARGET) -> list[str]:
    """Names of generated files that differ from, or are missing in, target."""
    with tempfile.TemporaryDirectory() as fresh:
        produced = generate(Path(fresh))
        expected = {p.name for p in produced}
        present = {p.name for p in target.glob("*") if p.is_file() and p.suffix in {".py", ".pyi"}}
        stale = sorted(expected ^ present)
        stale += [
            p.name
            for p in produced
            if (target / p.name).exists() and not filecmp.cmp(p, target / p.name, shallow=False)
        ]
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report whether client/v1 is stale")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code: " + ", ".join(stale) + " (run scripts/gen_proto.py)")
            return 1
        print("generated code is up to date")
        return 0
    for path in generate(TARGET):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
