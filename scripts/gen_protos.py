"""Generate serve/wire/gen/ from protos/: the one code-generation command (`make protos`).

    python scripts/gen_protos.py            # regenerate serve/wire/gen/ in place
    python scripts/gen_protos.py --out DIR  # write DIR/rnnserve/serve/wire/gen/ instead (tests compare)

protoc runs with the virtual include path `rnnserve/serve/wire/gen=protos`, so the
generated modules import each other as `from rnnserve.serve.wire.gen import ...`. Each
*_pb2.py is then rewritten to register its descriptors in the private pool of `_pool.py`
rather than protobuf's default pool: tritonclient registers its own `inference.*`
messages in the default pool, and the two must live in one process.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "rnnserve/serve/wire/gen"   # the import path (serve/ installs as rnnserve.serve)
TARGET = "serve/wire/gen"             # where it lives in the repository

DEFAULT_POOL = "_descriptor_pool.Default()"
POOL_IMPORT_AFTER = "from google.protobuf import descriptor_pool as _descriptor_pool\n"

INIT = '''"""Generated protobuf and gRPC modules (scripts/gen_protos.py). DO NOT EDIT."""
'''
POOL = '''"""The private descriptor pool of the generated modules (scripts/gen_protos.py). DO NOT EDIT.

tritonclient registers its own `inference.*` messages in protobuf's default pool;
ours live here so both can be imported in one process.
"""
from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
'''


def _use_private_pool(path: Path) -> None:
    text = path.read_text()
    if text.count(DEFAULT_POOL) != 1 or POOL_IMPORT_AFTER not in text:
        raise RuntimeError(f"{path}: unexpected protoc output; cannot switch to the private pool")
    text = text.replace(DEFAULT_POOL, "_pool.POOL")
    text = text.replace(POOL_IMPORT_AFTER, POOL_IMPORT_AFTER + "from rnnserve.serve.wire.gen import _pool\n", 1)
    path.write_text(text)


def generate(out_root: Path) -> Path:
    """Write the generated package under out_root/rnnserve/serve/wire/gen and return that folder."""
    gen = out_root / PACKAGE
    gen.mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTOS.glob("*.proto"))
    if not protos:
        raise RuntimeError(f"no .proto files in {PROTOS}")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PACKAGE}={PROTOS}",
           f"--python_out={out_root}", f"--grpc_python_out={out_root}", *map(str, protos)]
    subprocess.run(cmd, check=True, cwd=ROOT)
    for proto in protos:
        _use_private_pool(gen / f"{proto.stem}_pb2.py")
        grpc_module = gen / f"{proto.stem}_pb2_grpc.py"
        if grpc_module.exists() and "class " not in grpc_module.read_text():
            grpc_module.unlink()   # no service in this file: nothing to keep
    (gen / "__init__.py").write_text(INIT)
    (gen / "_pool.py").write_text(POOL)
    return gen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="write OUT/rnnserve/serve/wire/gen instead of replacing the repository's serve/wire/gen")
    args = parser.parse_args(argv)
    if args.out is not None:
        print(generate(args.out))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        target = ROOT / TARGET
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(fresh, target)
    for path in sorted(target.iterdir()):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
