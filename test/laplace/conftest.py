"""Make torchvision importable for laplace-torch (see ``docs/_torchvision.py``)."""

from test.utils import load_docs_module

load_docs_module("_torchvision").import_torchvision_for_laplace()
