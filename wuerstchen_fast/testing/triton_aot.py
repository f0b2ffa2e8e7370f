"""Compile Triton kernels for sm_80 / sm_90 with no GPU present, and read their resource use.

    python -m wuerstchen_fast.testing.triton_aot [--arch 80 90] [--json]

compiles every Triton kernel the op registry knows. It must run in a process where
TRITON_INTERPRET is unset: under the interpreter `triton.jit` gives interpreted functions that the
compiler refuses, so tests call this module in a subprocess.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` lowers a kernel to PTX and a
cubin on any machine. Registers and spills come from running Triton's bundled `ptxas -v` on that
PTX for the same arch (the numbers the driver would see). Every Triton kernel module lists what to
compile in `COMPILE_SPECS`: the tile shapes its launcher picks at the released model shapes.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


# Above 128 registers per thread a 4-warp program no longer fits 4 to an SM partition's register
# file; a kernel that needs more by design (flash attention) says so in its spec ("max_registers"
# with a "why"), so a growing register count elsewhere is caught, not waved through.
DEFAULT_MAX_REGISTERS = 128


@dataclass
class Resources:
    kernel: str
    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    max_registers: int = 128  # the spec's budget (see DEFAULT_MAX_REGISTERS)

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def __str__(self) -> str:
        return (f"{self.kernel} sm_{self.arch}: {self.registers} registers, {self.spill_stores} B spill stores, "
                f"{self.spill_loads} B spill loads, {self.shared_bytes} B shared")


def _ptxas() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(path) if path.exists() else "ptxas"


def compile_for(spec: dict, arch: int) -> Resources:
    """Compile one entry of a module's COMPILE_SPECS for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec["kernel"], signature=spec["signature"], constexprs=spec.get("constexprs", {}))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        Path(path).write_text(ptx)
        arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        out = subprocess.run([_ptxas(), f"-arch={arch_name}", "-v", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read ptxas -v output for {spec['name']}:\n{log}")
    return Resources(kernel=spec["name"], arch=arch, registers=int(regs.group(1)),
                     spill_stores=int(spill.group(1)), spill_loads=int(spill.group(2)),
                     shared_bytes=int(compiled.metadata.shared),
                     max_registers=int(spec.get("max_registers", DEFAULT_MAX_REGISTERS)))


def all_specs() -> list:
    """Every COMPILE_SPECS entry of every Triton module in the op registry."""
    import importlib

    from wuerstchen_fast.ops import registry

    specs = []
    for op in registry.all_ops():
        for module in op.triton_modules:
            specs += importlib.import_module(module).COMPILE_SPECS
    return specs


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel and arch")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's functions cannot be compiled")
    for spec in all_specs():
        for arch in args.arch:
            r = compile_for(spec, arch)
            print(json.dumps(r.__dict__) if args.json else r, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
