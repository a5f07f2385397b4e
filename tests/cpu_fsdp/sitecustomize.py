"""TEST LAUNCHER ONLY: let accelerate run FSDP on CPU processes (gloo), so the sharded paths are
tested on a machine without GPUs. Put on PYTHONPATH by tests/test_distributed.py, never by the product.

accelerate (1.15) turns a launch with ``ACCELERATE_USE_FSDP=true`` into ``DistributedType.FSDP``
only for GPU-like distributed types; on CPU processes it stays ``MULTI_CPU`` (plain DDP). This
wraps ``AcceleratorState.__init__`` to add ``MULTI_CPU`` to that list, nothing else.
"""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    import importlib.abc
    import sys

    def _patch(state_module) -> None:
        from accelerate.utils import DistributedType

        cls = state_module.AcceleratorState
        original = cls.__init__
        if getattr(original, "_cpu_fsdp_patch", False):
            return

        def __init__(self, *args, fsdp_plugin=None, **kwargs):
            original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin

        __init__._cpu_fsdp_patch = True
        cls.__init__ = __init__

    class _Finder(importlib.abc.MetaPathFinder):
        """Patch accelerate.state right after it is first imported."""

        def find_spec(self, name, path, target=None):
            if name != "accelerate.state":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module

            def patched_exec(module):
                exec_module(module)
                _patch(module)

            loader.exec_module = patched_exec
            return spec

    sys.meta_path.insert(0, _Finder())
