"""What a user installs: no file of the package or benchmarks/README.md names a document or a
path users do not have (this project's issue tracker, the developers' machine)."""
import os
import re

import gmem

PKG = os.path.dirname(os.path.abspath(gmem.__file__))
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# (the developers' root directory is spelled in two pieces so that this file does not name it)
PRIVATE = re.compile(r"/wor" r"k/|\bshared/spec\b|\bissue \d+|\(issue|\bAPI\.md\b|\bDESIGN\.md\b")


def _files():
    for d, _, names in os.walk(PKG):
        for n in names:
            if n.endswith((".py", ".pyi", ".json")):
                yield os.path.join(d, n)
    bench = os.path.join(ROOT, "benchmarks", "README.md")
    if os.path.exists(bench):
        yield bench


def test_no_private_references():
    bad = []
    for path in _files():
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if PRIVATE.search(line):
                    bad.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()[:100]}")
    assert bad == []


def test_schemas_ship_with_the_package():
    from gmem import schema
    for name in schema.NAMES:
        assert schema.path(name).is_file()
        assert schema.load(name)["$id"] == f"urn:kvm-gmem:{name}-1"


def test_one_version():
    from importlib import metadata
    try:
        assert metadata.version("kvm-gmem") == gmem.__version__
    except metadata.PackageNotFoundError:      # run in place, not installed
        pass
