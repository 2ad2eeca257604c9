"""The in-process tests' one-rank process group (gloo, real DeepSpeed), one per test module that asks for it.

DeepSpeed caches the groups it derives from the world group (deepspeed.utils.groups: the world group, the
`mpu` a pipeline engine leaves there, ...) and its communication backend (deepspeed.comm.comm.cdb). After the group is destroyed
those would point at a dead group, so the next module's engines would fail ("Group ... is not registered"):
the fixture puts them back as they were before it started.
"""
import os
import types

import pytest

from pipeline.launch.env import free_port

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def process_group():
    """A one-rank process group for this module, removed afterwards (other tests must not see one)."""
    import deepspeed
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist
    from deepspeed.utils import groups
    saved_env = {k: os.environ.get(k) for k in _ENV}
    cached = _state(groups)
    backend = ds_comm.cdb
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    yield
    dist.destroy_process_group()
    for name in set(_state(groups)) - set(cached):
        delattr(groups, name)
    vars(groups).update(cached)
    ds_comm.cdb = backend
    for key, value in saved_env.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _state(module):
    """A module's state: its global plain values (not its functions, classes or imported modules)."""
    return {name: value for name, value in vars(module).items()
            if not name.startswith("__") and not callable(value) and not isinstance(value, types.ModuleType)}
