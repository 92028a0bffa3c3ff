"""Generate the committed Python stubs in asm_wire/v1 from proto/asm/v1.

    python scripts/gen_protos.py           # regenerate in place
    python scripts/gen_protos.py --check   # exit 1 if the committed stubs drifted

protoc emits absolute imports that mirror the proto package (`asm.v1`); they are
rewritten to the Python package that ships them (`asm_wire.v1`), as Temporal's
gen_protos does.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "asm_wire" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")
_IMPORT_FIXES = (
    (re.compile(r"^from asm\.v1 import", re.M), "from asm_wire.v1 import"),
    (re.compile(r"^import asm\.v1\.(\w+)", re.M), r"import asm_wire.v1.\1"),
    (re.compile(r"\basm\.v1\.(\w+_pb2)\b"), r"asm_wire.v1.\1"),
)


def generate(dest: Path) -> list[Path]:
    protos = sorted(PROTO_DIR.rglob("*.proto"))
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
            f"--python_out={tmp}", f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}", f"--mypy_grpc_out={tmp}",
            *[str(p) for p in protos],
        ]
        subprocess.run(cmd, check=True, env=env)
        written = []
        for path in sorted(Path(tmp, "asm", "v1").iterdir()):
            if not path.name.endswith(GENERATED_SUFFIXES):
                continue
            text = path.read_text()
            for pattern, repl in _IMPORT_FIXES:
                text = pattern.sub(repl, text)
            target = dest / path.name
            target.write_text(text)
            written.append(target)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs differ")
    args = parser.parse_args()
    if not args.check:
        for old in OUT_DIR.glob("*_pb2*"):
            old.unlink()
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_text() for p in generate(Path(tmp))}
    current = {p.name: p.read_text() for p in OUT_DIR.iterdir() if p.name.endswith(GENERATED_SUFFIXES)}
    if fresh != current:
        drifted = sorted(set(fresh) ^ set(current) | {n for n in fresh if current.get(n) != fresh[n]})
        print(f"generated stubs drifted from proto/: {', '.join(drifted)}; run scripts/gen_protos.py", file=sys.stderr)
        return 1
    print("stubs match proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
