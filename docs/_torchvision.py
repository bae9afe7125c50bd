"""Make torchvision importable for laplace-torch, which imports it via torchmetrics.

PyPI's torchvision wheel that BackPACK pulls in is a CUDA build; beside the CPU build
of torch its C++ operators do not load, and ``import torchvision`` fails when it
registers meta kernels for ``torchvision::nms`` and ``torchvision::qnms``. Only then
are the two operator schemas defined (without kernels: nothing here calls them) and
torchvision imported again. curvlinops itself never imports torchvision.

Used where laplace-torch runs: the tests in ``test/laplace``, the tutorial
``example_laplace.py`` in the test suite (``test/test_tutorials.py``) and in the
documentation build (``conf.py``).
"""

import sys
from importlib.util import find_spec

import torch

_SCHEMAS = [
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
]
_LIBRARIES = []  # a schema lives as long as the library object that defined it


def import_torchvision_for_laplace():
    """Import torchvision if laplace-torch and torchvision are installed.

    Raises:
        RuntimeError: If torchvision fails to import for another reason.
    """
    if find_spec("laplace") is None or find_spec("torchvision") is None:
        return
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
