"""Compile the reparam_kl / reparam_sample / ddpm_step Triton kernels for sm_90 and sm_80.

No GPU is needed: ``triton.compile`` runs the full NVIDIA pipeline down to a cubin with the
bundled ptxas. This catches what the interpreter cannot (non-constexpr shapes, dtype
mixes the compiler rejects, scalar/tensor confusions), for every constexpr branch.
"""
import pytest

pytest.importorskip("triton")

from tests.kernels.aot_util import compile_in_subprocess, tl_dtype  # noqa: E402

RK = "dvpvae.kernels.reparam_kl"
DS = "dvpvae.kernels.ddpm_step"
ARCHES = ("sm90", "sm80")


def _acc(dt):
    # The accumulation dtype the launchers pick for a storage dtype.
    return tl_dtype("fp64" if dt == "fp64" else "fp32")


def _reparam_kl_fwd(dt, flags):
    p = f"*{dt}"
    acc = "fp64" if dt == "fp64" else "fp32"
    sig = {"qm_ptr": p, "qlv_ptr": p, "pm_ptr": p, "plv_ptr": p, "eps_ptr": p, "z_ptr": p,
           "part_ptr": f"*{acc}", "D": "i32", "chunk": "i32", "n_splits": "i32",
           "min_logvar": "fp32", "max_logvar": "fp32", "BLOCK": "constexpr", "ACC": "constexpr"}
    return RK, "_reparam_kl_fwd_kernel", sig, {"BLOCK": 1024, "ACC": _acc(dt)}


def _reparam_kl_bwd(dt, flags):
    p = f"*{dt}"
    sig = {n: p for n in ("qm_ptr", "qlv_ptr", "pm_ptr", "plv_ptr", "eps_ptr", "gz_ptr", "gk_ptr",
                          "dqm_ptr", "dqlv_ptr", "dpm_ptr", "dplv_ptr", "deps_ptr")}
    sig.update({"D": "i32", "chunk": "i32", "stride_gk": "i32", "min_logvar": "fp32",
                "max_logvar": "fp32", "BLOCK": "constexpr", "ACC": "constexpr",
                "HAS_GZ": "constexpr", "HAS_GK": "constexpr", "NEED_EPS": "constexpr"})
    return RK, "_reparam_kl_bwd_kernel", sig, {"BLOCK": 64, "ACC": _acc(dt), "HAS_GZ": flags[0],
                                            "HAS_GK": flags[1], "NEED_EPS": flags[2]}


def _sample_fwd(dt, flags):
    p = f"*{dt}"
    sig = {"pm_ptr": p, "plv_ptr": p, "eps_ptr": p, "z_ptr": p, "numel": "i32",
           "min_logvar": "fp32", "max_logvar": "fp32", "sqrt_temp": "fp32",
           "BLOCK": "constexpr", "ACC": "constexpr"}
    return RK, "_reparam_sample_fwd_kernel", sig, {"BLOCK": 1024, "ACC": _acc(dt)}


def _sample_bwd(dt, flags):
    p = f"*{dt}"
    sig = {"plv_ptr": p, "eps_ptr": p, "gz_ptr": p, "dplv_ptr": p, "deps_ptr": p, "numel": "i32",
           "min_logvar": "fp32", "max_logvar": "fp32", "sqrt_temp": "fp32",
           "BLOCK": "constexpr", "ACC": "constexpr", "NEED_EPS": "constexpr"}
    return RK, "_reparam_sample_bwd_kernel", sig, {"BLOCK": 256, "ACC": _acc(dt), "NEED_EPS": flags[0]}


def _ddpm_fwd(dt, flags):
    p = f"*{dt}"
    sig = {"zt_ptr": p, "eh_ptr": p, "nz_ptr": p, "coef_ptr": "*fp32", "step_ptr": "*i64",
           "out_ptr": p, "numel": "i32", "step": "i32", "T": "i32", "temperature": "fp32",
           "BLOCK": "constexpr", "ACC": "constexpr", "STEP_IN_MEMORY": "constexpr"}
    return DS, "_ddpm_step_fwd_kernel", sig, {"BLOCK": 1024, "ACC": _acc(dt),
                                                 "STEP_IN_MEMORY": flags[0]}


def _ddpm_bwd(dt, flags):
    p = f"*{dt}"
    sig = {"zt_ptr": p, "eh_ptr": p, "g_ptr": p, "coef_ptr": "*fp32", "step_ptr": "*i64",
           "dzt_ptr": p, "deh_ptr": p, "dnz_ptr": p, "numel": "i32", "step": "i32", "T": "i32",
           "temperature": "fp32", "BLOCK": "constexpr", "ACC": "constexpr",
           "STEP_IN_MEMORY": "constexpr", "NEED_NOISE": "constexpr"}
    return DS, "_ddpm_step_bwd_kernel", sig, {"BLOCK": 1024, "ACC": _acc(dt),
                                                 "STEP_IN_MEMORY": flags[0], "NEED_NOISE": flags[1]}


# (builder, dtype, constexpr flags): every kernel in fp32, each constexpr branch once, and
# the fp64 / bf16 storage variants of the forward kernels.
CASES = [
    (_reparam_kl_fwd, "fp32", ()),
    (_reparam_kl_fwd, "fp64", ()),
    (_reparam_kl_fwd, "bf16", ()),
    (_reparam_kl_bwd, "fp32", (True, True, True)),
    (_reparam_kl_bwd, "fp32", (False, True, False)),
    (_reparam_kl_bwd, "fp32", (True, False, False)),
    (_sample_fwd, "fp32", ()),
    (_sample_fwd, "bf16", ()),
    (_sample_bwd, "fp32", (True,)),
    (_ddpm_fwd, "fp32", (False,)),
    (_ddpm_fwd, "fp32", (True,)),
    (_ddpm_fwd, "fp64", (True,)),
    (_ddpm_fwd, "bf16", (False,)),
    (_ddpm_bwd, "fp32", (True, True)),
    (_ddpm_bwd, "fp32", (False, False)),
]


IDS = [f"{b.__name__[1:]}-{d}-{''.join('1' if f else '0' for f in fl)}" for b, d, fl in CASES]


@pytest.fixture(scope="module")
def compiled():
    """Compile every (case, arch) once, in one child process with the interpreter off."""
    jobs, keys = [], []
    for case_id, (build, dtype, flags) in zip(IDS, CASES):
        module, kernel, signature, constexprs = build(dtype, flags)
        for arch in ARCHES:
            jobs.append(dict(module=module, kernel=kernel, signature=signature,
                             constexprs=constexprs, arch=arch))
            keys.append((case_id, arch))
    return dict(zip(keys, compile_in_subprocess(jobs)))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("case_id", IDS)
def test_kernel_compiles_for_gpu(compiled, case_id, arch):
    res = compiled[(case_id, arch)]
    assert res["ok"], f"{case_id} for {arch} failed to compile:\n{res['error']}"
    assert res["cubin_bytes"] > 0 and res["name_in_ptx"], res
