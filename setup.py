"""memrl: memory-augmented multi-turn RL for LLMs, from scratch. `pip install -e ".[test]"`."""
from setuptools import find_packages, setup

setup(
    name="memrl",
    # Keep below 0.18: transformers probes for an unrelated top-level `kernels` package and would take ours
    # (same import name) for it at a version >= its minimum. tests/test_hf_io.py checks this.
    version="0.1.0",
    description="Train LLMs to reason when a problem arrives in pieces: bounded memory + verifiable-reward RL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["memrl", "memrl.*", "kernels", "kernels.*", "data_tools", "data_tools.*"]),
    install_requires=[
        "torch>=2.5",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=4.51",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "numpy",
        "huggingface_hub",
        "math-verify>=0.7",  # mathematical equivalence of \boxed{} answers
        "openai>=1.30",  # OpenAI-compatible chat-completions client for the LLM sharder
        "tqdm",
        "matplotlib",  # training-curve and evaluation plots
    ],
    extras_require={
        # scripts/gguf_to_hf.py: transformers reads GGUF files (the real models of ../shared/REAL_MODEL.md) with these
        "gguf": ["gguf>=0.10", "accelerate"],
        # optional experiment trackers (--train.tracker=...); each is imported only when chosen
        "tensorboard": ["tensorboard>=2.10"],
        "wandb": ["wandb>=0.16"],
        # the tests convert SmolLM2's GGUF for the real-model tier (tests/test_real_model.py), hence gguf's needs;
        # tensorboard: tests/test_trackers.py reads its event files
        "test": ["pytest>=7", "gguf>=0.10", "accelerate", "tensorboard>=2.10"],
    },
)
