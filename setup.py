from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="llama3",
    version="0.1.0",
    description="Run Meta's Llama 3.x models from their original checkpoints, on one device or many.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=("tests", "tests.*")),
    package_data={"llama": ["csrc/*.cpp"]},  # the CPU kernels, compiled on first use (int8_cpu.py, blocks_cpu.py)
    python_requires=">=3.10",
    install_requires=read_requirements(),
    # llguidance: constrained decoding (llama/grammar.py), which the server's response_format and tools use.
    # The test extra also holds the clients the server is checked with: openai (1.66 added the Responses API),
    # langchain-openai and openai-agents. prometheus-client: the server's GET /metrics.
    extras_require={"test": ["pytest>=7", "transformers>=4.45", "llama-models>=0.3", "gguf>=0.10",
                             "fastapi>=0.110", "uvicorn>=0.29", "openai>=1.66", "llguidance>=1.0",
                             "openai-agents>=0.1", "langchain-openai>=0.3", "prometheus-client>=0.20"],
                    "gguf": ["gguf>=0.10"],
                    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "llguidance>=1.0", "prometheus-client>=0.20"]},
)
