"""TEST LAUNCHER ONLY: let accelerate run FSDP and DeepSpeed ZeRO-3 on CPU processes (gloo), so
the sharded paths are tested on a machine without GPUs. Put on PYTHONPATH by
tests/test_distributed.py, never by the product.

accelerate (1.16) turns a launch with ``ACCELERATE_USE_FSDP=true`` into ``DistributedType.FSDP``
only for GPU-like distributed types, and one with ``ACCELERATE_USE_DEEPSPEED=true`` into
``DistributedType.DEEPSPEED`` only ``if not cpu``; on CPU processes both stay ``MULTI_CPU``
(plain DDP over gloo). This wraps ``AcceleratorState.__init__`` to do what accelerate does on a
GPU: set the distributed type and keep the plugin (for DeepSpeed, select it and let
``deepspeed.comm`` wrap the gloo process group accelerate already started), nothing else.
DeepSpeed itself runs on its CPU accelerator (``deepspeed.accelerator``: cpu, gloo).
"""

import os

_FSDP = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"

if _FSDP or _DEEPSPEED:
    import importlib.abc
    import sys

    _seen: dict = {}

    def _patch(state_module) -> None:
        from accelerate.utils import DistributedType

        cls = state_module.AcceleratorState
        original = cls.__init__
        if getattr(original, "_cpu_sharded_patch", False):
            return

        def __init__(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
            original(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
            if self.distributed_type != DistributedType.MULTI_CPU:
                return
            # a later AcceleratorState() without plugins (accelerate's optimizer wrapper makes one)
            # re-runs the CPU branch: the plugin first given stays the one in force
            deepspeed_plugin = _seen.setdefault("deepspeed", deepspeed_plugin) if deepspeed_plugin else _seen.get("deepspeed")
            if _FSDP and fsdp_plugin is not None:
                self.distributed_type = DistributedType.FSDP
                self.fsdp_plugin = fsdp_plugin
            elif _DEEPSPEED and deepspeed_plugin is not None:
                from deepspeed import comm

                if not comm.is_initialized():
                    comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
                self.distributed_type = DistributedType.DEEPSPEED
                deepspeed_plugin.set_mixed_precision(self._mixed_precision)
                self._mixed_precision = "no"  # DeepSpeed's config holds the precision, as on a GPU
                deepspeed_plugin.select(_from_accelerator_state=True)
                self.deepspeed_plugins = deepspeed_plugin

        __init__._cpu_sharded_patch = True
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
