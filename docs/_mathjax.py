"""Serve MathJax from the documentation itself, so that formulas render offline.

Sphinx points to a CDN by default, so a reader without network access sees raw
LaTeX. Instead, we fetch the ``mathjax`` package (the MathJax Consortium's
prebuilt components) from the npm registry with ``npm pack``, check it against
the pinned checksum, and unpack the files that the CommonHTML renderer loads into
``docs/_build/_vendor/mathjax``; ``conf.py`` adds that folder to the static files,
so every build ships ``_static/mathjax/tex-chtml.js`` with its fonts and extensions.

Run ``python docs/_mathjax.py`` to fetch it ahead of a build (``make install-docs``
does); ``conf.py`` fetches it when it is missing.
"""

import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "3.2.2"
# the npm registry's integrity field of mathjax@3.2.2 (SHA-512 of the tarball)
INTEGRITY = (
    "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/"
    "O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
)
# what tex-chtml.js loads: itself, TeX extensions (autoloaded), CommonHTML fonts,
# the context menu and the accessibility tools it offers (which load sre)
MEMBERS = ("tex-chtml.js", "input/tex/", "output/chtml/", "ui/", "a11y/", "sre/")
ENTRY_POINT = "mathjax/tex-chtml.js"  # relative to the static folder
VENDOR = Path(__file__).parent / "_build" / "_vendor"


def _wanted(name: str) -> bool:
    """Return whether a path of the npm tarball is one that we serve."""
    prefix = "package/es5/"
    if name == "package/LICENSE":  # Apache-2.0, shipped along
        return True
    return name.startswith(prefix) and name[len(prefix) :].startswith(MEMBERS)


def _check_integrity(tarball: Path):
    """Raise ``RuntimeError`` unless the tarball has the pinned checksum."""
    digest = base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest())
    if f"sha512-{digest.decode()}" != INTEGRITY:
        raise RuntimeError(f"{tarball.name} does not match the pinned checksum.")


def _npm_pack(destination: Path) -> Path:
    """Download the pinned MathJax tarball with npm and return its path."""
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            "The documentation serves MathJax itself and fetches it with npm: "
            "install Node.js and npm (e.g. `apt-get install npm`) and build again."
        )
    subprocess.run(
        [npm, "pack", f"mathjax@{VERSION}", "--pack-destination", str(destination)],
        check=True,
        capture_output=True,
    )
    return destination / f"mathjax-{VERSION}.tgz"


def ensure_mathjax(vendor: Path = VENDOR) -> Path:
    """Fetch MathJax into ``vendor/mathjax`` unless that version is there already.

    Args:
        vendor: Folder to add to Sphinx's ``html_static_path``.

    Returns:
        ``vendor``.

    Raises:
        RuntimeError: If npm is missing or the download is not the pinned one.
    """
    target = vendor / "mathjax"
    marker = target / "VERSION"
    if marker.is_file() and marker.read_text().strip() == VERSION:
        return vendor
    with tempfile.TemporaryDirectory() as tmp:
        tarball = _npm_pack(Path(tmp))
        _check_integrity(tarball)
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if _wanted(m.name)]
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(tmp, members=members, **safe)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(Path(tmp) / "package" / "es5", target)
        shutil.copy(Path(tmp) / "package" / "LICENSE", target / "LICENSE")
    marker.write_text(f"{VERSION}\n")
    return vendor


if __name__ == "__main__":
    print(f"MathJax {VERSION} in {ensure_mathjax() / 'mathjax'}", file=sys.stderr)
