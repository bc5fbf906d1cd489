"""The transformers releases Menos runs on, checked where a process starts.

Menos calls decoder blocks one by one (``menos.surgery``), so it depends on how
transformers lays out its layers, caches and masks, which moves between minor
releases. A release outside the tested range is refused with one line, before a
model is built: it could otherwise train or generate silently wrong tokens.
``setup.cfg`` declares the same range (a test holds them equal); CI runs the suite at
the newest end and the transformers-internals tests at the oldest (``make test-oldest``).
"""

from __future__ import annotations

TRANSFORMERS = ">=5.17,<5.25"
OLDEST_TRANSFORMERS = "5.17.0"  # the lent GPU machines' image has this one


def transformers_problem() -> str | None:
    """None if the installed transformers is in the supported range, else why not (one line).
    Reads the installed version without importing transformers (which takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    try:
        installed = version("transformers")
    except PackageNotFoundError:
        return f"transformers is not installed: pip install 'transformers{TRANSFORMERS}'"
    if Version(installed) in SpecifierSet(TRANSFORMERS, prereleases=True):
        return None
    return (f"transformers {installed} is installed, and Menos supports transformers{TRANSFORMERS} "
            f"(the releases it is tested on): pip install 'transformers{TRANSFORMERS}'")  # fmt: skip


def check_transformers() -> None:
    """RuntimeError with ``transformers_problem()``'s line, if there is one."""
    problem = transformers_problem()
    if problem:
        raise RuntimeError(problem)
