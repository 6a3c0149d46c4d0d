"""Whether hooks observe modules that a fused path would skip."""
from __future__ import annotations

from torch import nn


class HookWatch:
    """Whether any of `modules` has a forward (pre-)hook, or a global one is set: a fused path skips
    the modules' own forwards and would bypass them. Asked every step, so it keeps the modules'
    hook dicts (registering a hook adds to them in place) and tests those without a Python loop."""

    def __init__(self, modules):
        self._dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]

    def hooked(self) -> bool:
        g = nn.modules.module
        return any(self._dicts) or bool(g._global_forward_hooks or g._global_forward_pre_hooks)
