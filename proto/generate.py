"""Regenerate the committed protobuf modules from kvstore.proto.

Run `python -m kvstore.proto.generate` after editing the contract (needs grpcio-tools).
The .proto is compiled as `kvstore/proto/kvstore.proto` so that the generated
modules import each other as `kvstore.proto.*`, wherever the package lives.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUTPUTS = ("kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile kvstore.proto into `out_dir`; return the generated files. protoc runs in
    a process of its own: its bundled protobuf crashes a process that loaded NIXL."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "src")
        (src / "kvstore" / "proto").mkdir(parents=True)
        shutil.copy(HERE / "kvstore.proto", src / "kvstore" / "proto" / "kvstore.proto")
        gen = Path(tmp, "gen")
        gen.mkdir()
        argv = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{src}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            str(src / "kvstore" / "proto" / "kvstore.proto"),
        ]
        compiled = subprocess.run(argv, capture_output=True, text=True)
        if compiled.returncode != 0:
            raise RuntimeError(f"protoc failed on kvstore.proto: {compiled.stderr}")
        out_dir.mkdir(parents=True, exist_ok=True)
        return [
            Path(shutil.copy(gen / "kvstore" / "proto" / name, out_dir / name)) for name in OUTPUTS
        ]


if __name__ == "__main__":
    for path in generate(HERE):
        print(f"wrote {path}")
