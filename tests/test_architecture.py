"""The package keeps the shape README's Architecture section describes: one-way imports, small files and
functions, a model without private torch namespaces, and no heavy imports for `import llama`."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# README's rows, top (1) to bottom (8): a module may import only modules of a larger row number.
LAYERS = {
    1: ["example_text_completion", "example_chat_completion", "llama.chat", "llama.checkpoint.__main__",
        "llama.serve.__main__"],
    2: ["llama.cli", "llama.serve.app"],
    3: ["llama.generation", "llama.checkpoint.random_weights", "llama.checkpoint.reshard", "llama.checkpoint.hf",
        "llama.checkpoint.gguf", "llama.serve.runner", "llama.serve.reply_assembly",
        "llama.serve.translate", "llama.serve.responses_reply", "llama.serve.responses_protocol"],
    4: ["llama.checkpoint.load", "llama.checkpoint.write", "llama.checkpoint.hf_config",
        "llama.checkpoint.gguf_blocks", "llama.compile",
        "llama.engine", "llama.text_stream", "llama.validation", "llama.serve.protocol", "llama.serve.metrics",
        "llama.cpu_decode",
        "llama.serve.slow_clients"],
    5: ["llama.parallel", "llama.kernels", "llama.devices", "llama.tokenizer", "llama.request",
        "llama.fire_commands", "llama.logits_processing", "llama.prefix_cache", "llama.prefill_plan",
        "llama.prompt_lookup"],
    6: ["llama.model", "llama.sampling", "llama.checkpoint.layout", "llama.bpe", "llama.int8_cpu", "llama.bf16_cpu", "llama.int4",
        "llama.chat_format", "llama.grammar"],
    7: ["llama.args", "llama.blocks_cpu", "llama.chat_template", "llama.tool_prompt", "llama.tool_calls"],
    8: ["llama.block_quant", "llama.cpu_extension", "llama.file_pages"],
}
ROW = {module: row for row, modules in LAYERS.items() for module in modules}


def _path(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def _type_checking_blocks(tree: ast.Module) -> set[ast.AST]:
    """The nodes under `if TYPE_CHECKING:`: imports for annotations only, never run."""
    blocks = [node for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    return {inner for block in blocks for inner in ast.walk(block)}


def _imported(module: str) -> set[str]:
    """The package modules that `module` imports when it runs."""
    found = set()
    tree = ast.parse(_path(module).read_text())
    for node in set(ast.walk(tree)) - _type_checking_blocks(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in ROW}


def test_every_module_of_the_package_has_a_row():
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "llama").rglob("*.py")}
    modules -= {"llama.__init__", "llama.checkpoint.__init__", "llama.serve.__init__"}
    assert modules == {m for m in ROW if m.startswith("llama.")}


@pytest.mark.parametrize("module", sorted(ROW))
def test_imports_only_point_down(module):
    upward = sorted(name for name in _imported(module) if ROW[name] <= ROW[module])
    assert not upward, f"{module} (row {ROW[module]}) imports {upward}"


@pytest.mark.parametrize("path", sorted((ROOT / "llama").rglob("*.py")), ids=lambda p: p.name)
def test_files_and_functions_read_in_one_sitting(path):
    source = path.read_text()
    assert source.count("\n") <= 400
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert node.end_lineno - node.lineno + 1 <= 60, f"{path.name}: {node.name} is too long"


def test_the_model_uses_no_private_torch_namespaces():
    source = (ROOT / "llama" / "model.py").read_text()
    for private in ("torch.ops", "torch._inductor", "torch._dynamo", "fairscale", "torch.distributed"):
        assert private not in source


def test_import_llama_and_build_import_none_of_fire_transformers_or_prometheus(tiny_checkpoint):
    code = ("import sys, llama; llama.Llama.build(sys.argv[1], device='cpu', max_seq_len=8, max_batch_size=1); "
            "print(sorted({'fire', 'transformers', 'prometheus_client'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint(1))], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
