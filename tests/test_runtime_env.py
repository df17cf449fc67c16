"""How the runtime completes the process-group environment a launcher left partial."""
import os

import pytest

from pipeline import runtime

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
       "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE",
       "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
       "PMI_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher variables; whatever the code under test sets is removed afterwards (monkeypatch only undoes
    the variables it touched, and the runtime sets the missing ones in os.environ)."""
    saved = dict(os.environ)
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_plain_run_becomes_a_world_of_one(clean_env):
    runtime._ensure_process_group_env()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")
    assert os.environ["MASTER_PORT"].isdigit()


def test_hand_made_launch_keeps_its_rank_and_world(clean_env):
    import os

    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("MASTER_ADDR", "10.0.0.1")
    clean_env.setenv("MASTER_PORT", "29500")
    runtime._ensure_process_group_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("1", "2", "10.0.0.1")


def test_srun_without_torchrun_uses_slurm_variables(clean_env):
    import os

    for name, value in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "1",
                        "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(name, value)
    runtime._ensure_process_group_env()
    assert [os.environ[n] for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["3", "4", "1", "2"]


def test_sbatch_script_without_srun_is_one_process(clean_env):
    """In an sbatch script, SLURM_NTASKS is the allocation's task count, but a plain command is ONE process."""
    import os

    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0"}.items():
        clean_env.setenv(name, value)
    runtime._ensure_process_group_env()
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("0", "1")


def test_multi_process_without_master_port_is_a_clear_error(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        runtime._ensure_process_group_env()


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1, 0, 1, "single")),
    ({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, (2, 4, 0, 2, "launcher")),
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8"}, (1, 2, 1, 2, "launcher")),
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "4(x2)"},
     (5, 8, 1, 4, "slurm")),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, (0, 1, 0, 1, "single")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (3, 4, 1, 2, "mpi")),
])
def test_resolve_world_order_of_sources(env, expected):
    from data.world import resolve_world

    world = resolve_world(env)
    assert (world.rank, world.size, world.local_rank, world.local_size, world.source) == expected


@pytest.mark.parametrize("env", [{"RANK": "4", "WORLD_SIZE": "4"}, {"RANK": "x", "WORLD_SIZE": "2"},
                                 {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "0"}])
def test_resolve_world_refuses_inconsistent_values(env):
    from data.world import resolve_world

    with pytest.raises(ValueError, match="RANK|rank|SLURM"):
        resolve_world(env)
