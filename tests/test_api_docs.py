"""The public API documents itself: every name in the public packages' `__all__` (nitrokernels, nitrokernels.nn,
.nitro, .optim, .graph, .ops) has a docstring, and every function / class has type hints on its signature (each
named parameter and a function's return), and the public methods and properties a class defines have docstrings
(inherited ones count). Data constants (BACKENDS, REGISTRY, SDXL_LEVELS) carry no docstring of their own and are
not checked. A package without __all__ would be checked on the public names its __init__ binds."""
from __future__ import annotations

import importlib
import inspect
import types

import pytest

pytest.importorskip("diffusers")  # nitrokernels.nitro's names import it

PACKAGES = ("nitrokernels", "nitrokernels.nn", "nitrokernels.nitro", "nitrokernels.optim", "nitrokernels.graph",
            "nitrokernels.ops")
CHECKS = ("docstring", "hints", "methods")

def public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)]
    return sorted(names)


def api():
    out = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        for name in public_names(module):
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType) or callable(obj):
                out.append((f"{package}.{name}", obj))
    return out


API = api()


def _cases():
    for qualname, obj in API:
        for check in CHECKS:
            if isinstance(obj, types.ModuleType) and check != "docstring":
                continue
            yield pytest.param(qualname, obj, check, id=f"{qualname}-{check}")


def missing_docstring(obj) -> list[str]:
    own = obj.__doc__ if inspect.isclass(obj) or isinstance(obj, types.ModuleType) else inspect.getdoc(obj)
    return [] if (own or "").strip() else ["no docstring"]


def missing_hints(obj) -> list[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    signature = inspect.signature(target)
    missing = [f"parameter {p.name!r}" for p in signature.parameters.values()
               if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               and p.annotation is inspect.Parameter.empty]
    if not inspect.isclass(obj) and signature.return_annotation is inspect.Signature.empty:
        missing.append("return annotation")
    return missing


def missing_method_docs(obj) -> list[str]:
    if not inspect.isclass(obj):
        return []
    missing = []
    for name, member in vars(obj).items():
        if name.startswith("_"):
            continue
        func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if not callable(func):
            continue
        doc = func.__doc__
        if not doc:  # an override documented by a base class counts
            doc = next((getattr(getattr(base, name, None), "__doc__", None) for base in obj.__mro__[1:]
                        if getattr(getattr(base, name, None), "__doc__", None)), None)
        if not (doc or "").strip():
            missing.append(name)
    return missing


@pytest.mark.parametrize("qualname,obj,check", list(_cases()))
def test_public_name_is_documented_and_typed(qualname, obj, check):
    problems = {"docstring": missing_docstring, "hints": missing_hints, "methods": missing_method_docs}[check](obj)
    assert not problems, f"{qualname}: {check}: {problems}"


def test_the_checks_catch_what_they_should():
    """The checks fail on an undocumented, unannotated function / class (so removing a docstring fails the test)."""
    def bare(x, y=1):
        return x

    class Bare:
        def __init__(self, a):
            self.a = a

        @property
        def size(self):
            return 1

    assert missing_docstring(bare) == ["no docstring"] and missing_docstring(Bare) == ["no docstring"]
    assert missing_hints(bare) == ["parameter 'x'", "parameter 'y'", "return annotation"]
    assert missing_hints(Bare) == ["parameter 'a'"] and missing_method_docs(Bare) == ["size"]


def test_the_packages_names_were_found():
    assert len(API) >= 30 and {"nitrokernels.nn.FusedGEGLU", "nitrokernels.nitro.NitroDistiller"} <= {q for q, _ in API}


def test_lazy_names_resolve_and_deprecated_ones_are_not_advertised():
    """Every name a package lists for lazy import resolves (a stale entry pointing at a missing module or name
    fails here); nitro's deprecated aliases still resolve but are left out of __all__ (and so of this API)."""
    import nitrokernels
    import nitrokernels.nitro as nitro

    for package in (nitrokernels, nitro):
        for name in package._LAZY:
            assert getattr(package, name) is not None, f"{package.__name__}.{name}"
    assert nitro._DEPRECATED and not set(nitro._DEPRECATED) & set(nitro.__all__)
    for name in nitro._DEPRECATED:
        assert callable(getattr(nitro, name))


def test_nn_all_lists_exactly_its_public_names():
    import nitrokernels.nn as nn_package

    bound = {n for n, v in vars(nn_package).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert sorted(nn_package.__all__) == sorted(bound)


def test_every_eager_reference_is_used():
    """ops/reference.py holds the references of the ops that exist: each public function in it is named by some
    other file of the package, the tests or the benchmarks (an op removed leaves no orphan reference behind)."""
    import pathlib

    from nitrokernels.ops import reference

    here = pathlib.Path(__file__).resolve().parents[1]
    folders = (pathlib.Path(reference.__file__).resolve().parents[1], here / "tests", here / "benchmarks")
    texts = [p.read_text() for folder in folders for p in folder.rglob("*.py") if p.name != "reference.py"]
    functions = [n for n, v in vars(reference).items() if inspect.isfunction(v) and v.__module__ == reference.__name__
                 and not n.startswith("_")]
    assert functions
    unused = [n for n in functions if not any(n in text for text in texts)]
    assert not unused, f"unused eager references in ops/reference.py: {unused}"
