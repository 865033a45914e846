"""Install with `pip install -e ".[dev]"`.

torch is a range, not a pin: a user's own CUDA build satisfies it and is never reinstalled. On a bare CPU
machine install `torch==2.13.0` first (the README and .ci/run do), or pip pulls a multi-GB CUDA wheel.
"""
from setuptools import setup

setup(
    name="lasp",
    version="0.1.0",
    description="Exact sequence-parallel training of linear-attention and hybrid LLMs (LASP-2, LASP-2H)",
    python_requires=">=3.11",
    # One import root, `lasp`: the top-level folders the users asked for are its subpackages (lasp.kernels is
    # kernels/, ...), so nothing we install is named `kernels` or `models` beside Hugging Face's `kernels` package
    # (a transformers >= 5 dependency) or anyone else's. docs/launch.md ("One import root") says why.
    packages=["lasp", "lasp.kernels", "lasp.parallel", "lasp.models", "lasp.launch"],
    package_dir={"lasp": "lasp", "lasp.kernels": "kernels", "lasp.parallel": "parallel", "lasp.models": "models",
                 "lasp.launch": "launch"},
    package_data={"lasp.launch": ["configs/*.toml", "slurm/*.sbatch", "corpus/*.jsonl.gz"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.15",
        "megatron-core>=0.10",
        "wandb>=0.17",
        "sentencepiece>=0.2",
        "safetensors",          # transformers-format folders (launch/convert.py)
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout", "transformers>=5"]},
)
