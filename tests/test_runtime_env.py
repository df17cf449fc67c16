"""How the runtime completes the process-group environment a launcher left partial."""
import pytest

from pipeline import runtime

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
       "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


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

    for name, value in {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                        "SLURM_NTASKS_PER_NODE": "2", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(name, value)
    runtime._ensure_process_group_env()
    assert [os.environ[n] for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")] == ["3", "4", "1", "2"]


def test_multi_process_without_master_port_is_a_clear_error(clean_env):
    clean_env.setenv("RANK", "0")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="MASTER_PORT"):
        runtime._ensure_process_group_env()
