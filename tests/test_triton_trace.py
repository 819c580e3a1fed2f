"""torch.compile(fullgraph=True) traces FastDVPVAE's training step with the triton provider,
forward and backward, through the fused ops of dvpvae.kernels.

Two paths, both on CPU:

* the interpreter (TRITON_INTERPRET=1, this process): each op is one opaque node of the
  AOTAutograd graphs (interpreted kernels cannot be traced into) and the aot_eager-compiled
  step runs the kernels and computes the eager numbers;
* the GPU path (a child process with TRITON_INTERPRET=0, run as ``python
  tests/test_triton_trace.py``): the same compile decomposes every op into
  ``triton_kernel_wrapper_functional`` launches of its kernels, as inductor receives them on
  CUDA. Nothing runs there (no GPU): the compiled function raises once its graphs are built.
"""
import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from dvpvae import FastDVPVAE, Noise
from dvpvae.kernels import triton_runs_on
from dvpvae.ops import TritonOps

HERE = os.path.dirname(os.path.abspath(__file__))

FWD_OPS = {"conv1x1_act", "conv1x1_residual", "dct_pseudoinput", "idct_pseudoinput", "reparam_kl"}
# The data image takes no gradient, so the step's backward has no dct_pseudoinput_bwd.
BWD_OPS = {"conv1x1_input_grad", "conv1x1_weight_grad", "idct_pseudoinput_bwd", "reparam_kl_bwd"}


def _step_inputs(ops, seed=5):
    """A training-mode FastDVPVAE on the perturbed tiny preset, a batch and its draws."""
    from test_fast import perturbed

    ref, x = perturbed("tiny", seed=seed)
    fast = FastDVPVAE.from_reference(ref, compile=False, ops=ops)
    fast.train()
    x = x[:2]
    draws = fast.forward_draws(2, x, Noise(generator=torch.Generator().manual_seed(3)),
                               full_bound=False)
    return fast, x, draws


def _ops_in(gm, namespace="dvpvae_kernels"):
    return {str(n.target).split(".")[1] for n in gm.graph.nodes
            if n.op == "call_function" and str(n.target).startswith(namespace + ".")}


needs_interpreter = pytest.mark.skipif(
    not triton_runs_on("cpu"), reason="needs TRITON_INTERPRET=1 set before triton is imported")


@needs_interpreter
def test_training_step_compiles_fullgraph_and_matches_eager():
    from torch._dynamo.backends.debugging import aot_eager, boxed_nop

    fast, x, draws = _step_inputs(TritonOps())
    loss, rec, kl = fast._loss_terms(x, draws)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in fast.named_parameters() if p.grad is not None}
    fast.zero_grad(set_to_none=True)

    graphs = {}

    def record(name):
        def compiler(gm, example_inputs):
            graphs.setdefault(name, []).append(gm)
            return boxed_nop(gm, example_inputs)
        return compiler

    torch._dynamo.reset()
    backend = functools.partial(aot_eager, fw_compiler=record("fw"), bw_compiler=record("bw"))
    step = torch.compile(fast._loss_terms, backend=backend, fullgraph=True)
    loss_c, rec_c, kl_c = step(x, draws)
    loss_c.backward()
    torch._dynamo.reset()

    # One dynamo graph, so one forward and one backward graph; the fused ops in both.
    assert len(graphs["fw"]) == 1 and len(graphs["bw"]) == 1
    assert _ops_in(graphs["fw"][0]) == FWD_OPS
    assert _ops_in(graphs["bw"][0]) == BWD_OPS
    # The graphs run the same kernels on the same inputs as eager: the same bits.
    for a, b in ((loss, loss_c), (rec, rec_c), (kl, kl_c)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    grads_c = {k: p.grad for k, p in fast.named_parameters() if p.grad is not None}
    assert grads_c.keys() == grads.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- GPU path

# Kernels each public function's forward and backward graph launch on the GPU path.
PUBLIC_KERNELS = {
    "conv1x1_act": ({"_conv1x1_act_fwd_kernel"},
                    {"_conv1x1_act_bwd_dx_kernel", "_conv1x1_act_bwd_dw_kernel"}),
    "conv1x1_residual": ({"_conv1x1_residual_fwd_kernel"},
                         {"_conv1x1_act_bwd_dx_kernel", "_conv1x1_act_bwd_dw_kernel"}),
    "dct_pseudoinput": ({"_dct_fwd_kernel"}, {"_dct_bwd_kernel"}),
    "idct_pseudoinput": ({"_idct_fwd_kernel"}, {"_idct_bwd_kernel"}),
    "reparam_kl": ({"_reparam_kl_fwd_kernel"}, {"_reparam_kl_bwd_kernel"}),
    "reparam_sample": ({"_reparam_sample_fwd_kernel"}, {"_reparam_sample_bwd_kernel"}),
    "ddpm_step-int_step": ({"_ddpm_step_fwd_kernel"}, {"_ddpm_step_bwd_kernel"}),
    "ddpm_step-tensor_step": ({"_ddpm_step_fwd_kernel"}, {"_ddpm_step_bwd_kernel"}),
    "training_step": ({"_conv1x1_act_fwd_kernel", "_conv1x1_residual_fwd_kernel",
                       "_dct_fwd_kernel", "_idct_fwd_kernel", "_reparam_kl_fwd_kernel"},
                      {"_conv1x1_act_bwd_dx_kernel", "_conv1x1_act_bwd_dw_kernel",
                       "_idct_bwd_kernel", "_reparam_kl_bwd_kernel"}),
}


@pytest.fixture(scope="module")
def gpu_path():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", sorted(PUBLIC_KERNELS))
def test_gpu_path_decomposes_every_op_into_its_kernels(gpu_path, case):
    """On the GPU path the forward and backward graphs hold the kernel launches themselves
    (no opaque op left, so inductor sees them), and each launch copies only buffers the op
    allocated: no input is written."""
    res = gpu_path[case]
    fwd, bwd = PUBLIC_KERNELS[case]
    assert res["graphs"] == {"fw": 1, "bw": 1}
    assert set(res["fw"]) == fwd and set(res["bw"]) == bwd
    assert res["opaque"] == []
    assert res["written_inputs"] == []


def _public_calls():
    from dvpvae.kernels.conv1x1_act import conv1x1_act
    from dvpvae.kernels.conv1x1_residual import conv1x1_residual
    from dvpvae.kernels.dct_pseudoinput import dct_pseudoinput, idct_pseudoinput
    from dvpvae.kernels.ddpm_step import ddpm_coefficients, ddpm_step
    from dvpvae.kernels.reparam_kl import reparam_kl, reparam_sample

    coef = ddpm_coefficients(10, -6.0, 7.0)
    lat = [torch.randn(3, 1, 7, 7) for _ in range(5)]
    scale = torch.rand(3, 4, 4) + 1.0
    return {
        "conv1x1_act": (conv1x1_act, [torch.randn(2, 5, 6, 7), torch.randn(3, 5, 1, 1),
                                      torch.randn(3)], ("silu",)),
        "conv1x1_residual": (conv1x1_residual, [torch.randn(2, 5, 6, 7), torch.randn(3, 5, 1, 1),
                                                torch.randn(3), torch.randn(2, 3, 6, 7),
                                                torch.tensor(0.7)], ()),
        "dct_pseudoinput": (dct_pseudoinput, [torch.rand(2, 3, 8, 8)], (scale, 4)),
        "idct_pseudoinput": (idct_pseudoinput, [torch.rand(2, 3, 4, 4)], (scale, (8, 8))),
        "reparam_kl": (reparam_kl, lat, (-3.0,)),
        "reparam_sample": (reparam_sample, lat[2:], (-3.0, 0.5)),
        "ddpm_step-int_step": (ddpm_step, lat[:3], (coef, 4, 0.8)),
        "ddpm_step-tensor_step": (ddpm_step, lat[:3], (coef, torch.tensor(4), 0.8)),
    }


def _trace_gpu_path() -> dict:
    """Child process: compile every public function and the training step with the GPU
    kernels (interpreter off) and describe their AOTAutograd graphs."""
    assert os.environ.get("TRITON_INTERPRET") == "0"
    import triton
    from triton.backends.compiler import GPUTarget
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from dvpvae.kernels import _triton

    class Sm90:
        # Which arguments a launch writes is read off the kernel's TTIR, whose generation
        # asks the active driver only for its target; a machine without a GPU has no driver.
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    _triton.triton_runs_on = lambda device: True  # CPU tensors stand in for CUDA ones

    class Traced(Exception):
        pass

    def describe(fn, args):
        graphs = {}

        def record(name):
            def compiler(gm, example_inputs):
                graphs.setdefault(name, []).append(gm)

                def never_run(*_):
                    raise Traced
                never_run._boxed_call = True
                return never_run
            return compiler

        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))
        step = torch.compile(fn, fullgraph=True, backend=backend)
        # The backward graph is compiled with the forward instead of at the first backward.
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            try:
                step(*args)
            except Traced:
                pass
        out = {"graphs": {k: len(v) for k, v in graphs.items()}, "opaque": [], "written_inputs": []}
        allocations = {"aten.empty.memory_format", "aten.empty_like.default", "aten.zeros.default",
                       "aten.new_empty.default", "aten.empty_strided.default"}
        for name, gms in graphs.items():
            kernels = set()
            for gm in gms:
                out["opaque"] += sorted(_ops_in(gm))
                for n in gm.graph.nodes:
                    if n.op != "call_function" or "triton_kernel_wrapper" not in str(n.target):
                        continue
                    kernel = kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__
                    kernels.add(kernel)
                    for arg in n.kwargs["tensors_to_clone"]:
                        if str(n.kwargs["kwargs"][arg].target) not in allocations:
                            out["written_inputs"].append(f"{kernel}:{arg}")
            out[name] = sorted(kernels)
        return out

    result = {}
    for case, (fn, diff, rest) in _public_calls().items():
        result[case] = describe(fn, [*(t.requires_grad_() if t is not None else None for t in diff),
                                     *rest])
    fast, x, draws = _step_inputs(TritonOps())
    result["training_step"] = describe(fast._loss_terms, (x, draws))
    return result


if __name__ == "__main__":
    print(json.dumps(_trace_gpu_path()))
