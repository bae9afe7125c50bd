"""Offline intersphinx inventories for the objects our documentation links to.

The build machines have no internet access, so instead of downloading the
``objects.inv`` files of Python, PyTorch, NumPy, SciPy and BackPACK, ``conf.py``
writes small inventories with the objects we reference, pointing to the real
documentation.
Add an entry here when the documentation links to a new external object.
"""

import zlib
from pathlib import Path

PROJECTS = {
    "python": (
        "https://docs.python.org/3/",
        [
            ("object", "py:class", "library/functions.html#object"),
            ("enum.Enum", "py:class", "library/enum.html#enum.Enum"),
            (
                "collections.abc.MutableMapping",
                "py:class",
                "library/collections.abc.html#collections.abc.MutableMapping",
            ),
            (
                "collections.abc.Callable",
                "py:class",
                "library/collections.abc.html#collections.abc.Callable",
            ),
            (
                "collections.abc.Iterable",
                "py:class",
                "library/collections.abc.html#collections.abc.Iterable",
            ),
        ],
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        [
            ("torch", "py:module", "torch.html#module-torch"),
            ("torch.Tensor", "py:class", "tensors.html#torch.Tensor"),
            ("torch.Generator", "py:class", "generated/torch.Generator.html"),
            ("torch.nn.Module", "py:class", "generated/torch.nn.Module.html"),
            ("torch.nn.MSELoss", "py:class", "generated/torch.nn.MSELoss.html"),
            (
                "torch.nn.CrossEntropyLoss",
                "py:class",
                "generated/torch.nn.CrossEntropyLoss.html",
            ),
            (
                "torch.nn.BCEWithLogitsLoss",
                "py:class",
                "generated/torch.nn.BCEWithLogitsLoss.html",
            ),
            ("torch.nn.Linear", "py:class", "generated/torch.nn.Linear.html"),
            ("torch.nn.Conv2d", "py:class", "generated/torch.nn.Conv2d.html"),
            ("torch.func", "py:module", "func.html#module-torch.func"),
            ("torch.func.jvp", "py:function", "generated/torch.func.jvp.html"),
            ("torch.func.vjp", "py:function", "generated/torch.func.vjp.html"),
            ("torch.func.vmap", "py:function", "generated/torch.func.vmap.html"),
            ("torch.func.hessian", "py:function", "generated/torch.func.hessian.html"),
            ("torch.func.jacrev", "py:function", "generated/torch.func.jacrev.html"),
            ("torch.allclose", "py:function", "generated/torch.allclose.html"),
            (
                "torch.utils.data.DataLoader",
                "py:class",
                "data.html#torch.utils.data.DataLoader",
            ),
            ("torch.distributed", "py:module", "distributed.html"),
            ("torch.linalg.eigh", "py:function", "generated/torch.linalg.eigh.html"),
            (
                "torch.linalg.eigvalsh",
                "py:function",
                "generated/torch.linalg.eigvalsh.html",
            ),
            ("torch.linalg.solve", "py:function", "generated/torch.linalg.solve.html"),
            ("torch.no_grad", "py:class", "generated/torch.no_grad.html"),
            ("torch.save", "py:function", "generated/torch.save.html"),
            ("torch.load", "py:function", "generated/torch.load.html"),
            ("torch.dtype", "py:class", "tensor_attributes.html#torch.dtype"),
            ("torch.device", "py:class", "tensor_attributes.html#torch.device"),
            ("torch.optim.SGD", "py:class", "generated/torch.optim.SGD.html"),
        ],
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        [
            ("numpy.ndarray", "py:class", "reference/generated/numpy.ndarray.html"),
            ("numpy.dtype", "py:class", "reference/generated/numpy.dtype.html"),
            (
                "numpy.random.seed",
                "py:function",
                "reference/random/generated/numpy.random.seed.html",
            ),
        ],
    ),
    "scipy": (
        "https://docs.scipy.org/doc/scipy/",
        [
            (
                "scipy.sparse.linalg.LinearOperator",
                "py:class",
                "reference/generated/scipy.sparse.linalg.LinearOperator.html",
            ),
            (
                "scipy.sparse.linalg.eigsh",
                "py:function",
                "reference/generated/scipy.sparse.linalg.eigsh.html",
            ),
            (
                "scipy.sparse.linalg.cg",
                "py:function",
                "reference/generated/scipy.sparse.linalg.cg.html",
            ),
            (
                "scipy.sparse.linalg.lsmr",
                "py:function",
                "reference/generated/scipy.sparse.linalg.lsmr.html",
            ),
        ],
    ),
    "backpack": (
        "https://docs.backpack.pt/en/master/",
        [
            ("backpack", "py:module", "main-api.html#module-backpack"),
            ("backpack.extend", "py:function", "main-api.html#backpack.extend"),
            ("backpack.backpack", "py:class", "main-api.html#backpack.backpack"),
        ],
    ),
}


def write_inventories(directory: Path) -> dict:
    """Write one inventory per project and return the ``intersphinx_mapping``."""
    directory.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for project, (url, entries) in PROJECTS.items():
        header = (
            "# Sphinx inventory version 2\n"
            f"# Project: {project}\n# Version: \n"
            "# The remainder of this file is compressed using zlib.\n"
        )
        body = "".join(f"{name} {role} 1 {uri} -\n" for name, role, uri in entries)
        path = directory / f"{project}.inv"
        path.write_bytes(header.encode() + zlib.compress(body.encode()))
        mapping[project] = (url, str(path))
    return mapping
