"""C++ kernels for x86 CPUs, compiled on first use and called through ctypes.

torch's `torch.utils.cpp_extension` builds each source into torch's extension cache (once per torch version and
source); that needs a C++ compiler, as `torch.compile` on the CPU does, and ninja. The kernels here use AVX-512
VNNI, so they are only built on Linux x86-64 processors that have it; elsewhere, or where the build fails (which a
warning says once), `load_library` returns None and the caller keeps torch's kernels.
"""

import ctypes
import os
import platform
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional


def processor_has_vnni() -> bool:
    """Whether this processor has AVX-512 VNNI (the integer dot products) and AVX-512 BW."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_vnni" in flags and " avx512bw" in flags


def load_library(name: str, source: Path, signatures: dict[str, list], feature: str,
                 fallback: str) -> Optional[ctypes.CDLL]:
    """The compiled `source` as extension `name`, its functions' argument types set from `signatures` (function
    name -> ctypes argument types; they return nothing), or None where it cannot run: not Linux x86-64 with VNNI,
    or the build failed, which is then warned as "`feature`: could not build the CPU kernel ... (why); `fallback`".

    The caller caches the result, so that the warning is given once.
    """
    if platform.system() != "Linux" or platform.machine() != "x86_64" or not processor_has_vnni():
        return None
    _put_pip_ninja_on_path()
    try:
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for runs on torch's own OpenMP threads (the libgomp torch has loaded).
        path = load(name, [str(source)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                    is_python_module=False)
        library = ctypes.CDLL(path)
    except Exception as error:  # no compiler, no ninja, a read-only cache: torch's kernels still work
        warnings.warn(f"{feature}: could not build the CPU kernel {source.name} ({_reason(error)}); {fallback}",
                      stacklevel=3)
        return None
    for function_name, argtypes in signatures.items():
        function = getattr(library, function_name)
        function.argtypes = argtypes
        function.restype = None
    return library


def _reason(error: Exception) -> str:
    """One line of a failed build's error: the compiler's complaint rather than its command line, where found."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    complaints = [line for line in lines[1:] if re.search(r"error|not found|no such file", line, re.IGNORECASE)]
    return (complaints or lines)[0][:300]


def _put_pip_ninja_on_path() -> None:
    # torch's builder runs `ninja` from PATH, which lacks the virtual environment's bin/ unless it is activated.
    try:
        import ninja
    except ImportError:
        return
    if shutil.which("ninja") is None:
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
