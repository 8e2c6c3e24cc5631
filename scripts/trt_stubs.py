"""Unpack PyPI's `tensorrt-stubs` wheel into a folder mypy can read, fixing its syntax errors.

    python scripts/trt_stubs.py tensorrt_stubs-*.whl build/trt-stubs

The generated stubs name parameters `in` (a keyword) and give `add_scale_nd` a parameter
without a default after parameters with defaults; both are patched here, then every file is
parsed so any new error fails loudly instead of silently disabling the type check. The stubs
are not installed into the virtual environment: a `tensorrt/__init__.pyi` there would make
`import tensorrt` succeed as an empty namespace package.
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
import zipfile
from pathlib import Path

PATCHES = [
    (re.compile(r"([(,]\s*)in(\s*:)"), r"\1in_\2"),  # parameter named `in`
    (re.compile(r"(power: Weights = None, channel_axis: int)(\))"), r"\1 = 0\2"),
]


def main(wheel: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(".pyi"):
                text = zf.read(name).decode()
                for pattern, repl in PATCHES:
                    text = pattern.sub(repl, text)
                ast.parse(text, filename=name)  # raises on anything left unfixed
                target = out / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.pyi"))
    if "tensorrt/__init__.pyi" not in found:
        sys.exit(f"{wheel}: no tensorrt/__init__.pyi inside; is it the tensorrt-stubs wheel?")
    print(f"{out}: {', '.join(found)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
