"""Install dvpvae; build the optional C++/CUDA extension ``dvpvae._C`` where a toolchain allows.

    pip install --no-build-isolation -e .     # torch must already be installed

Environment switches:
  DVPVAE_SKIP_EXT_BUILD=1   install the pure-Python package only (the ops fall back to
                            PyTorch; ``dvpvae._ext.build()`` can JIT-build later).
  DVPVAE_FORCE_CPU_EXT=1    build the CPU extension even when torch has CUDA.
  DVPVAE_CUDA_ARCHS="80;90" compute capabilities for the CUDA build (default "80;90").

The extension is optional: a failed compile prints a warning and the install goes on
(setuptools ``optional=True``), so a machine without a compiler still gets the package.
"""
import os
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _flag(name):
    return os.environ.get(name, "0") == "1"


def _cuda_arch_flags():
    archs = [a.strip().replace(".", "") for a in os.environ.get("DVPVAE_CUDA_ARCHS", "80;90").split(";")
             if a.strip()]
    flags = []
    for a in archs:
        if not a.isdigit():
            raise ValueError(f"DVPVAE_CUDA_ARCHS entries must look like 80 or 9.0, got {a!r}")
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return flags


def extension_modules():
    """Return (ext_modules, cmdclass); empty when the build is skipped or impossible."""
    if _flag("DVPVAE_SKIP_EXT_BUILD"):
        print("dvpvae: DVPVAE_SKIP_EXT_BUILD=1, not building the C++ extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("dvpvae: torch is not importable at build time (use "
                      "`pip install --no-build-isolation -e .`); skipping the C++ extension")
        return [], {}

    # Relative source paths (setuptools rejects absolute ones), absolute include dirs.
    sources = ["csrc/dvpvae_ext.cpp", "csrc/ddpm_cpu.cpp", "csrc/unet_cpu.cpp", "csrc/conv_wgrad_cpu.cpp"]
    # cpp_extension adds neither -O3 nor -fopenmp; without -fopenmp at::parallel_for
    # compiles to a serial loop even though libtorch itself uses OpenMP.
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    link = ["-fopenmp"]
    kwargs = dict(include_dirs=[CSRC], extra_link_args=link, optional=True)

    use_cuda = torch.version.cuda is not None and not _flag("DVPVAE_FORCE_CPU_EXT")
    if use_cuda and CUDA_HOME is None:
        warnings.warn("dvpvae: torch was built with CUDA but CUDA_HOME is not set / nvcc not "
                      "found; building the CPU-only extension")
        use_cuda = False
    if use_cuda:
        sources += ["csrc/ddpm_cuda.cu", "csrc/ddpm_cuda_glue.cpp"]
        # No --use_fast_math: the step should round like the CPU kernel and the reference.
        nvcc = ["-O3", "-std=c++20"] + _cuda_arch_flags()
        ext = CUDAExtension("dvpvae._C", sources, extra_compile_args={"cxx": cxx + ["-DDVPVAE_WITH_CUDA"],
                                                                      "nvcc": nvcc}, **kwargs)
    else:
        ext = CppExtension("dvpvae._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="dvpvae",
    version="0.1.0",
    description="Fast, faithful DVP-VAE (hierarchical VAE with a diffusion-based VampPrior)",
    packages=find_packages(include=["dvpvae", "dvpvae.*", "kernels", "kernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.3",
        "triton; platform_system=='Linux'",
        "numpy",
        "einops",
        "tqdm",
        "ninja",
        "safetensors",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "scipy"]},
    entry_points={"console_scripts": ["dvpvae-train=dvpvae.train:main",
                                      "dvpvae-evaluate=dvpvae.evaluate:main"]},
)
