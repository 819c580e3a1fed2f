"""Ahead-of-time GPU builds (sm_90 and sm_80, no GPU needed) of the DCT-pseudoinput and
1x1-convolution kernels, with the constexpr values their launchers use on CUDA.

The interpreter tests check the arithmetic; this checks that the compiler accepts the
kernels (constexpr shapes, fp64 tl.dot, tl.math.erf, masked int64 addressing) for the
hardware they are written for.
"""
import inspect

import pytest

pytest.importorskip("triton")

from tests.kernels.aot_util import compile_in_subprocess  # noqa: E402


def _sig(module, kernel, pointers, dtype, constexprs):
    """Signature dict: ``pointers`` get ``*dtype``, constexprs ``constexpr``, others i32."""
    import importlib

    fn = getattr(importlib.import_module(module), kernel)
    params = inspect.signature(getattr(fn, "fn", fn)).parameters
    sig = {}
    for name in params:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = "*" + dtype
        else:
            sig[name] = "i32"
    return sig


DCT = "dvpvae.kernels.dct_pseudoinput"
ACT = "dvpvae.kernels.conv1x1_act"
RES = "dvpvae.kernels.conv1x1_residual"
DCT_BLOCKS = {"BH": 32, "BW": 32, "BK": 16}  # MNIST/CIFAR10 planes, ctx 7 or 5
CONV_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}  # the GPU tiles of the launchers

CASES = [
    # (module, kernel, pointer params, constexprs, dtypes). Every kernel builds for both
    # targets in fp32; fp64 (DMMA tl.dot) and the extra activation variants build for one
    # target only, to keep the number of compile jobs moderate.
    (DCT, "_dct_fwd_kernel", {"x_ptr", "dh_ptr", "dw_ptr", "scale_ptr", "u_ptr", "v_ptr"},
     {**DCT_BLOCKS, "SAVE_V": True}, ("fp32", "fp64")),
    (DCT, "_dct_bwd_kernel", {"gu_ptr", "v_ptr", "dh_ptr", "dw_ptr", "scale_ptr", "gx_ptr"},
     DCT_BLOCKS, ("fp32",)),
    (DCT, "_idct_fwd_kernel", {"u_ptr", "dh_ptr", "dw_ptr", "scale_ptr", "x_ptr"},
     DCT_BLOCKS, ("fp32", "fp64")),
    (DCT, "_idct_bwd_kernel", {"gx_ptr", "u_ptr", "dh_ptr", "dw_ptr", "scale_ptr", "gu_ptr"},
     DCT_BLOCKS, ("fp32",)),
    (ACT, "_conv1x1_act_fwd_kernel", {"x_ptr", "w_ptr", "b_ptr", "y_ptr", "z_ptr"},
     {**CONV_BLOCKS, "HAS_BIAS": True, "ACT": 4, "STORE_Z": True}, ("fp32", "fp64")),
    (ACT, "_conv1x1_act_fwd_kernel", {"x_ptr", "w_ptr", "b_ptr", "y_ptr", "z_ptr"},
     {**CONV_BLOCKS, "HAS_BIAS": False, "ACT": 2, "STORE_Z": False}, ("fp32@sm90",)),
    (ACT, "_conv1x1_act_fwd_kernel", {"x_ptr", "w_ptr", "b_ptr", "y_ptr", "z_ptr"},
     {**CONV_BLOCKS, "HAS_BIAS": True, "ACT": 3, "STORE_Z": True}, ("fp32@sm90",)),
    (ACT, "_conv1x1_act_bwd_dx_kernel", {"gy_ptr", "z_ptr", "w_ptr", "scale_ptr", "gx_ptr"},
     {**CONV_BLOCKS, "ACT": 4, "HAS_SCALE": False}, ("fp32",)),
    (ACT, "_conv1x1_act_bwd_dx_kernel", {"gy_ptr", "z_ptr", "w_ptr", "scale_ptr", "gx_ptr"},
     {**CONV_BLOCKS, "ACT": 0, "HAS_SCALE": True}, ("fp32",)),
    (ACT, "_conv1x1_act_bwd_dw_kernel", {"gy_ptr", "z_ptr", "x_ptr", "gw_ptr", "gb_ptr"},
     {**CONV_BLOCKS, "ACT": 1, "HAS_BIAS": True}, ("fp32", "fp64")),
    (RES, "_conv1x1_residual_fwd_kernel",
     {"h_ptr", "w_ptr", "b_ptr", "skip_ptr", "gate_ptr", "out_ptr"},
     {**CONV_BLOCKS, "HAS_BIAS": True}, ("fp32", "fp64")),
]


def _archs(dtype):
    if "@" in dtype:
        return (dtype.split("@")[1],)
    return ("sm90", "sm80") if dtype == "fp32" else ("sm80",)


JOBS = [
    dict(module=mod, kernel=name, arch=arch,
         signature=_sig(mod, name, ptrs, dtype.split("@")[0], cx),
         constexprs=cx)
    for mod, name, ptrs, cx, dtypes in CASES
    for dtype in dtypes
    for arch in _archs(dtype)
]
JOB_IDS = [f"{j['kernel']}-{j['signature'][next(iter(j['signature']))][1:]}-{j['arch']}-{i}"
           for i, j in enumerate(JOBS)]


@pytest.fixture(scope="module")
def results():
    # One child process (interpreter off) compiles every job: the import is paid once.
    return compile_in_subprocess(JOBS)


@pytest.mark.parametrize("job", range(len(JOBS)), ids=JOB_IDS)
def test_compiles_for_gpu(results, job):
    res = results[job]
    assert res["ok"], res["error"]
    assert res["name_in_ptx"], f"{JOBS[job]['kernel']} not found in the PTX"
