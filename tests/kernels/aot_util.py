"""Ahead-of-time compilation of ``@triton.jit`` kernels for real GPUs, without a GPU.

``triton.compile`` runs the whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin via
the bundled ``ptxas``) for an explicit ``GPUTarget``, so a CPU-only machine can prove that
a kernel builds for the hardware it is written for. The interpreter tests cannot catch
this class of bug: the interpreter runs any Python it is given, while the compiler rejects
non-constexpr shapes, unsupported dtype mixes, scalar/tensor confusions and so on.

One wrinkle: the kernel tests set ``TRITON_INTERPRET=1`` before Triton is imported, so
``@triton.jit`` returns ``InterpretedFunction`` wrappers that the compiler does not accept
(nor may a compiled kernel reference them as helpers). ``jit_function`` rebuilds a real
``JITFunction`` from the wrapped Python function, recursively for the ``@triton.jit``
helpers it calls, on a private copy of the module globals so the interpreter-side objects
stay untouched; ``compile_kernel`` also switches the interpreter flag off for the duration
of the compile. Compiling and interpreting in the same process is therefore fine.

Usage::

    from tests.kernels.aot_util import TARGETS, compile_kernel
    k = compile_kernel(my_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                       constexprs={"BLOCK": 128}, target=TARGETS["sm90"])
    assert k.asm["cubin"]

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
    # Compile with the interpreter switched off: with TRITON_INTERPRET=1, Triton's
    # constexpr helpers return raw Python values instead of constexpr objects, which the
    # code generator then trips over ("'value' object has no attribute 'dtype'").
    # knobs.runtime.scope() restores the flag (and the environment variable) afterwards.
    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        return triton.compile(src, target=target or TARGETS["sm90"], options=options)


def assert_built(compiled, name=None):
    """Check that the compile produced PTX and a non-empty cubin for the right kernel."""
    asm = compiled.asm
    assert "ptx" in asm and "cubin" in asm, f"missing stages: {sorted(asm)}"
    assert len(asm["cubin"]) > 0, "empty cubin"
    if name is not None:
        assert name in asm["ptx"], f"kernel {name!r} not found in the PTX"
