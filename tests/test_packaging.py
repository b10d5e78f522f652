"""The package installs as documented, and CI runs the test command that README.md gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run the tests", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "README's 'Run the tests' section should show exactly one command"
    return blocks[0].strip()


def test_ci_runs_readmes_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines


def test_ci_installs_cpu_torch_before_the_project():
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("torch==2.13.0") < ci.index(_readme_test_command())


def test_requirements_have_lower_bounds_and_no_pins():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    names = {re.split(r"[<>=!~ ]", line)[0].lower() for line in lines}
    assert names == {"torch", "fairscale", "tiktoken", "regex", "jinja2", "fire", "blobfile", "ninja"}
    for line in lines:
        assert ">=" in line and "==" not in line, line


def test_setup_reads_requirements_and_declares_test_extra(monkeypatch):
    import setuptools  # noqa: F401  (first, so that distutils below is setuptools' own)
    from distutils.core import run_setup

    monkeypatch.chdir(ROOT)
    dist = run_setup(str(ROOT / "setup.py"), stop_after="init")
    requirements = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip()]
    assert dist.install_requires == requirements
    assert str(dist.python_requires) == ">=3.10"
    test_extra = {re.split(r"[<>=]", r)[0] for r in dist.extras_require["test"]}
    # gguf: tests/test_gguf.py; fastapi, uvicorn, openai: tests/test_serve.py; llguidance: tests/test_constrained.py;
    # langchain-openai: tests/test_serve_tools.py; openai-agents: tests/test_responses.py;
    # prometheus-client: tests/test_metrics.py (and the server's /metrics)
    assert test_extra == {"pytest", "transformers", "llama-models", "gguf", "fastapi", "uvicorn", "openai",
                          "llguidance", "openai-agents", "langchain-openai", "prometheus-client"}
    assert dist.extras_require["gguf"] == ["gguf>=0.10"]
    serve_extra = {re.split(r"[<>=]", r)[0] for r in dist.extras_require["serve"]}
    assert serve_extra == {"fastapi", "uvicorn", "llguidance", "prometheus-client"} and serve_extra <= test_extra
    assert "llama" in dist.packages and "tests" not in dist.packages


def test_public_names_are_exported():
    import llama

    for name in ("Tokenizer", "ChatFormat", "Dialog", "Message", "Llama", "ModelArgs", "Transformer"):
        assert name in llama.__all__ and hasattr(llama, name)
