"""Install dvpvae; build the optional C++ extension ``dvpvae._C`` where a toolchain allows.

    pip install --no-build-isolation -e .     # torch must already be installed

``kernels/`` is installed as ``dvpvae.kernels``. The extension (csrc/: the native CPU
sampler of the diffusion prior and the convolution weight gradients) is CPU-only and
optional: a failed compile prints a warning and the install goes on (setuptools
``optional=True``), and ``DVPVAE_SKIP_EXT_BUILD=1`` skips it; without it the ops fall back
to plain PyTorch.
"""
import glob
import os
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def extension_modules():
    """Return (ext_modules, cmdclass); empty when the build is skipped or impossible."""
    if os.environ.get("DVPVAE_SKIP_EXT_BUILD", "0") == "1":
        print("dvpvae: DVPVAE_SKIP_EXT_BUILD=1, not building the C++ extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("dvpvae: torch is not importable at build time (use "
                      "`pip install --no-build-isolation -e .`); skipping the C++ extension")
        return [], {}

    # Relative source paths (setuptools rejects absolute ones), absolute include dirs.
    sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(CSRC, "*.cpp")))
    # cpp_extension adds neither -O3 nor -fopenmp; without -fopenmp at::parallel_for
    # compiles to a serial loop even though libtorch itself uses OpenMP.
    ext = CppExtension("dvpvae._C", sources, include_dirs=[CSRC],
                       extra_compile_args={"cxx": ["-O3", "-std=c++20", "-fopenmp"]},
                       extra_link_args=["-fopenmp"], optional=True)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="dvpvae",
    version="0.1.0",
    description="Fast, faithful DVP-VAE (hierarchical VAE with a diffusion-based VampPrior)",
    packages=find_packages(include=["dvpvae", "dvpvae.*"], exclude=["dvpvae.kernels"]) + ["dvpvae.kernels"],
    package_dir={"dvpvae.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "triton; platform_system=='Linux'",
        "numpy",
        "tqdm",
        "ninja",
        "safetensors",
        "huggingface_hub>=0.28",
        "jinja2",  # huggingface_hub's model card template
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "scipy"]},
    entry_points={"console_scripts": ["dvpvae-train=dvpvae.train:main",
                                      "dvpvae-evaluate=dvpvae.evaluate:main",
                                      "dvpvae-export=dvpvae.export:main"]},
)
