"""Which process of a job this is (rank, world size, local rank): one rule for every stage.

In order, the first that applies:
1. an initialised ``torch.distributed`` process group (its rank and size; the local rank from the environment);
2. a launcher's variables: ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun, ``accelerate launch``,
   ``deepspeed``, or set by hand);
3. an ``srun`` step: ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` / ``SLURM_LOCALID``. Only srun sets
   ``SLURM_STEP_NUM_TASKS``: a plain ``python`` in an sbatch script (``SLURM_NTASKS`` = the allocation's tasks) is
   one process, not one of ``SLURM_NTASKS``;
4. Open MPI's ``mpirun``: ``OMPI_COMM_WORLD_RANK`` / ``_SIZE`` / ``_LOCAL_RANK``;
5. else a world of one.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Mapping, Optional

__all__ = ["World", "resolve_world"]

# (rank, world size, local rank, local world size) variables of each launcher, in order of precedence.
_LAUNCHERS = (
    ("launcher", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
     "OMPI_COMM_WORLD_LOCAL_SIZE"),
)


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int
    source: str          # "torch.distributed", "launcher", "slurm", "mpi" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _integer(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value.split("(")[0].split(",")[0])     # SLURM_STEP_TASKS_PER_NODE may read "4(x2)"
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_world(environ: Optional[Mapping[str, str]] = None) -> World:
    """This process's place in the job (see the module docstring); raises ValueError on inconsistent values."""
    environ = os.environ if environ is None else environ
    # A process group exists only where torch.distributed was imported: do not import torch (~450 MB) to ask.
    dist = sys.modules.get("torch.distributed")
    if environ is os.environ and dist is not None and dist.is_available() and dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
        local = _integer(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        local_size = _integer(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else size
        return _checked(World(rank, size, local, local_size, "torch.distributed"))
    for source, rank_var, size_var, local_var, local_size_var in _LAUNCHERS:
        if rank_var in environ and size_var in environ:
            rank, size = _integer(environ, rank_var), _integer(environ, size_var)
            local = _integer(environ, local_var) if local_var in environ else (0 if size == 1 else rank)
            local_size = _integer(environ, local_size_var) if local_size_var in environ else size
            return _checked(World(rank, size, local, local_size, source))
    return World(0, 1, 0, 1, "single")


def process_group_size() -> int:
    """Ranks in the initialised torch.distributed process group; 1 without one (torch is not imported to ask)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _checked(world: World) -> World:
    if world.size < 1 or not 0 <= world.rank < world.size or not 0 <= world.local_rank < max(world.local_size, 1):
        raise ValueError(f"inconsistent process placement from {world.source}: rank {world.rank} of {world.size}, "
                         f"local rank {world.local_rank} of {world.local_size}")
    return world
