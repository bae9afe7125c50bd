"""Make torchvision importable for laplace-torch, which imports it via torchmetrics.

PyPI's torchvision wheel that BackPACK pulls in is a CUDA build; beside the CPU build
of torch its C++ operators do not load, and ``import torchvision`` fails when it
registers meta kernels for ``torchvision::nms`` and ``torchvision::qnms``. Only then,
and only for these tests, the two operator schemas are defined here (without kernels:
nothing here calls them) and torchvision is imported again. The package itself never
imports torchvision.
"""

import sys
from importlib.util import find_spec

import torch

_SCHEMAS = [
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
]
_LIBRARIES = []  # a schema lives as long as the library object that defined it


def _import_torchvision():
    try:
        import torchvision  # noqa: F401
    except RuntimeError as error:  # its operators failed to load
        if "torchvision::nms" not in str(error):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]  # forget the half-imported submodules
        library = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            library.define(schema)
        _LIBRARIES.append(library)
        import torchvision  # noqa: F401, F811


if find_spec("laplace") is not None and find_spec("torchvision") is not None:
    _import_torchvision()
