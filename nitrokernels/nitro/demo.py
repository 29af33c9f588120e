"""Moved to nitrokernels.digits.demo; this old path is the same module, with a DeprecationWarning."""
from nitrokernels._moved import alias_module

alias_module(__name__, "nitrokernels.digits.demo")
