"""Package metadata for synthbandit_jax.

Dependency ranges are pinned to what runs on the project's machines: jax/jaxlib 0.10.x on the
CPU machines (0.10.2 is the newest served there) and 0.11.x on the GPU machine.
"""
from setuptools import find_packages, setup

setup(
    name="synthbandit_jax",
    version="0.1.0",
    description=(
        "JAX/Flax multi-armed-bandit training on synthetic data "
        "(reimplementation and extension of arXiv 2412.05466)"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["synthbandit_jax", "synthbandit_jax.*"]),
    install_requires=[
        "jax>=0.10.0,<0.12",
        "jaxlib>=0.10.0,<0.12",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "chex>=0.1.90,<0.2",
        "absl-py>=2.1,<3",
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        "pillow>=10.0,<14",
        "matplotlib>=3.8,<4",
        "tqdm>=4.66,<5",
        "scikit-learn>=1.4,<2",
    ],
    extras_require={
        # tensorflow-datasets: its mock data tests the tfds adapter without TensorFlow.
        # gguf + transformers + diffusers: the parity tests of our Llama, CLIP text encoder,
        # UNet, VAE and samplers against the PyTorch reference implementations.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "tensorflow-datasets>=4.9,<5",
                 "gguf>=0.19,<0.20", "transformers>=5.0,<6", "diffusers>=0.40,<0.50"],
        # Loading GGUF checkpoints (SmolLM2 offline asset) for the attribute stage.
        "llm": ["gguf>=0.19,<0.20", "transformers>=5.0,<6"],
        # PyTorch peers for benchmarks (and, later, weight import / parity tests).
        # 2.13.0 is the CPU wheel that lies on the project's CPU machines.
        "torch": ["torch>=2.9,<2.15"],
        # tensorflow-datasets adapter (needs internet to download real datasets).
        "tfds": ["tensorflow-datasets>=4.9,<5"],
    },
)
