"""Install dvpvae; build the optional C++/CUDA extension where a toolchain allows."""
from setuptools import find_packages, setup

setup(
    name="dvpvae",
    version="0.1.0",
    description="Fast, faithful DVP-VAE (hierarchical VAE with a diffusion-based VampPrior)",
    packages=find_packages(include=["dvpvae", "dvpvae.*", "kernels", "kernels.*"]),
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
