"""Ahead-of-time compilation of ``@triton.jit`` kernels for real GPUs, without a GPU.

``triton.compile`` runs the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via
the bundled ``ptxas``) for an explicit ``GPUTarget``, so a CPU-only machine can prove that
a kernel builds for the hardware it is written for. The interpreter tests cannot catch
this class of bug: the interpreter runs any Python it is given, while the compiler rejects
non-constexpr shapes, unsupported dtype mixes, scalar/tensor confusions and so on.

One wrinkle: the kernel tests set ``TRITON_INTERPRET=1`` before Triton is imported, and in
that mode *every* ``@triton.jit`` function, including Triton's own standard library
(``tl.sum``, ``tl.cdiv``, ...), becomes an ``InterpretedFunction`` that the compiler cannot
lower (it ends up calling the interpreter's builder mid-compile). A process that imported
Triton in interpreter mode cannot compile kernels. Hence two entry points:

* ``compile_kernel(fn, signature, constexprs, target)``: in-process, for processes where
  the interpreter is off (raises a clear error otherwise);
* ``compile_in_subprocess(jobs)``: what interpreter-mode tests use. It starts one child
  Python with ``TRITON_INTERPRET=0`` which imports each kernel by module and name,
  compiles every job and reports per-job results as JSON. One child per batch pays the
  import cost once.

Usage from a test (interpreter on)::

    from tests.kernels.aot_util import compile_in_subprocess, tl_dtype
    res = compile_in_subprocess([dict(module="dvpvae.kernels.reparam_kl",
                                      kernel="_reparam_sample_fwd_kernel",
                                      signature={"pm_ptr": "*fp32", ..., "BLOCK": "constexpr",
                                                 "ACC": "constexpr"},
                                      constexprs={"BLOCK": 1024, "ACC": tl_dtype("fp32")},
                                      arch="sm90")])
    assert res[0]["ok"], res[0]["error"]

``tl_dtype("fp32")`` is the JSON-safe spelling of a ``tl.float32`` constexpr value.

Signature strings are Triton's: ``*fp32``/``*fp64``/``*bf16`` pointers, ``i32``/``i64``
integers, ``fp32`` floats, and ``constexpr`` for every ``tl.constexpr`` parameter (whose
value goes into ``constexprs``).
"""
from __future__ import annotations

import types

try:
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new layouts
        InterpretedFunction = ()
except ImportError:  # pragma: no cover - tests skip when triton is missing
    triton = None
    knobs = None
    GPUTarget = None
    JITFunction = None
    InterpretedFunction = ()

# Warp size 32 on NVIDIA. sm_90 (H100) and sm_80 (A100) are the GPUs the kernels target.
TARGETS = {} if triton is None else {
    "sm90": GPUTarget("cuda", 90, 32),
    "sm80": GPUTarget("cuda", 80, 32),
}


def _raw_python_function(fn):
    if isinstance(fn, JITFunction) or (InterpretedFunction and isinstance(fn, InterpretedFunction)):
        return fn.fn
    return fn


def jit_function(fn, _memo=None):
    """Return a compilable ``JITFunction`` for ``fn`` (a JITFunction or interpreter wrapper)."""
    if triton is None:
        raise RuntimeError("AOT compilation needs the triton package: pip install triton")
    memo = {} if _memo is None else _memo
    raw = _raw_python_function(fn)
    if raw in memo:
        return memo[raw]
    if isinstance(fn, JITFunction) and not any(
            isinstance(v, InterpretedFunction) for v in raw.__globals__.values()
            if InterpretedFunction):
        memo[raw] = fn  # already compilable and references no interpreter wrapper
        return fn
    # Private globals: swap interpreter wrappers for JITFunctions without touching the
    # module the interpreter keeps using.
    scope = dict(raw.__globals__)
    clone = types.FunctionType(raw.__code__, scope, raw.__name__, raw.__defaults__, raw.__closure__)
    clone.__qualname__ = raw.__qualname__
    clone.__module__ = raw.__module__
    clone.__doc__ = raw.__doc__
    jit = JITFunction(clone)
    memo[raw] = jit  # before recursing: kernels may reference each other
    for name in raw.__code__.co_names:
        value = scope.get(name)
        if isinstance(value, JITFunction) or (InterpretedFunction and isinstance(value, InterpretedFunction)):
            scope[name] = jit_function(value, memo)
    return jit


def compile_kernel(fn, signature, constexprs=None, target=None, num_warps=None, num_stages=None):
    """Compile ``fn`` for ``target`` (default sm_90) and return the ``CompiledKernel``.

    ``signature`` maps every parameter name to its Triton type string; constexpr
    parameters map to ``"constexpr"`` and take their value from ``constexprs``.
    """
    if knobs.runtime.interpret:
        raise RuntimeError(
            "compile_kernel cannot run in a process that imported Triton with "
            "TRITON_INTERPRET=1 (Triton's own jit helpers are interpreter wrappers there); "
            "use compile_in_subprocess")
    jit = jit_function(fn)
    missing = [a for a in jit.arg_names if a not in signature]
    if missing:
        raise ValueError(f"signature of {jit.__name__} misses parameters {missing}")
    constexprs = dict(constexprs or {})
    for name, kind in signature.items():
        if kind == "constexpr" and name not in constexprs:
            raise ValueError(f"constexpr parameter {name!r} of {jit.__name__} needs a value")
    src = triton.compiler.ASTSource(fn=jit, signature=dict(signature), constexprs=constexprs)
    options = {}
    if num_warps is not None:
        options["num_warps"] = num_warps
    if num_stages is not None:
        options["num_stages"] = num_stages
    return triton.compile(src, target=target or TARGETS["sm90"], options=options)


def assert_built(compiled, name=None):
    """Check that the compile produced PTX and a non-empty cubin for the right kernel."""
    asm = compiled.asm
    assert "ptx" in asm and "cubin" in asm, f"missing stages: {sorted(asm)}"
    assert len(asm["cubin"]) > 0, "empty cubin"
    if name is not None:
        assert name in asm["ptx"], f"kernel {name!r} not found in the PTX"


# ------------------------------------------------------------------ subprocess batch compile
def tl_dtype(name):
    """JSON-safe stand-in for a ``tl.<dtype>`` constexpr value (e.g. ``"fp32"``)."""
    return {"__tl_dtype__": name}


_TL_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64",
             "i32": "int32", "i64": "int64"}


def _decode(value):
    if isinstance(value, dict) and "__tl_dtype__" in value:
        import triton.language as tl

        name = value["__tl_dtype__"]
        return getattr(tl, _TL_NAMES.get(name, name))
    return value


def _run_jobs(jobs):
    import importlib
    import traceback

    results = []
    for job in jobs:
        res = {"kernel": job["kernel"], "arch": job["arch"], "ok": False, "error": None,
               "cubin_bytes": 0, "name_in_ptx": False}
        try:
            fn = getattr(importlib.import_module(job["module"]), job["kernel"])
            constexprs = {k: _decode(v) for k, v in job.get("constexprs", {}).items()}
            compiled = compile_kernel(fn, job["signature"], constexprs, target=TARGETS[job["arch"]],
                                      num_warps=job.get("num_warps"))
            res["cubin_bytes"] = len(compiled.asm.get("cubin", b""))
            res["name_in_ptx"] = job["kernel"] in compiled.asm.get("ptx", "")
            res["ok"] = "ptx" in compiled.asm and res["cubin_bytes"] > 0
            if not res["ok"]:
                res["error"] = f"stages produced: {sorted(compiled.asm)}"
        except Exception:  # report every failure, keep compiling the other jobs
            res["error"] = traceback.format_exc(limit=-6)
        results.append(res)
    return results


def compile_in_subprocess(jobs, timeout=600):
    """Compile ``jobs`` (dicts: module, kernel, signature, constexprs, arch[, num_warps]) in a
    child process with the interpreter off; return one result dict per job
    (``ok``, ``error``, ``cubin_bytes``, ``name_in_ptx``)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], input=json.dumps(jobs),
                          capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile child failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    # The child prints exactly one JSON line last; anything before it is stray output.
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(_run_jobs(json.loads(sys.stdin.read()))))
