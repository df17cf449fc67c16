"""varitok train-tokenizer / calibrate-entropy: real launches on generated shards, resume, bad inputs.

Launches (subprocesses, started together to share the start-up cost), all on 32px images of tiny.yaml:
phase 1: ``single`` (1 plain process, one fixed 2-image batch, no discriminator: loss must fall),
``zero2`` (accelerate launch, 2 processes, ZeRO-2, grad_accum 2, discriminator from step 2, EMA),
``node0``/``node1`` (the same run as ZeRO-1 on 2 simulated machines with a static rendezvous, killed with
SIGKILL once its step-3 checkpoint exists). Phase 2: ``resume`` (the killed run resumed by a 2-process
accelerate launch), ``zero1`` (the same run straight through, as ZeRO-1: the resume's reference),
``nan`` (an infinite loss weight: the NaN guard must stop the run), ``zero3`` (refused).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import ACCELERATE, free_port, launch_env, start_process

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
SIZE = 32
# tiny.yaml at 32px with a narrow discriminator; every launch below shares these.
SMALL = [f"data.image_size={SIZE}", f"model.encoder.resolution={SIZE}", f"model.decoder.resolution={SIZE}",
         "data.batch_size=2", "data.num_workers=0", "loss.disc_ndf=16", "train.zero_stage=0"]
PAIR = SMALL + [f"train.max_steps={STEPS}", "train.log_every=2", "train.ckpt_every=3", "train.image_every=3",
                "loss.disc_start=2", "train.ema_decay=0.9", "train.grad_accum=2", "train.keep_last=2"]
SINGLE = SMALL + ["train.max_steps=24", "train.log_every=1", "train.ckpt_every=100", "train.image_every=100",
                  "loss.disc_start=1000", "optim.lr=2e-3", "optim.warmup_steps=2", "model.router.budget_weight=0"]


def make_shards(root: Path, num_images: int, per_shard: int) -> Path:
    """Real shards (varitok shard's library) of procedural 32px images."""
    from data.demo_images import write_image_folder
    from data.shards import ShardOptions, shard_images

    folder = write_image_folder(root / "images", num_images=num_images, size=SIZE, num_classes=2)
    shard_images([str(folder)], root / "shards", ShardOptions(image_size=SIZE, format="png", shard_size=per_shard),
                 progress=False)
    return root / "shards"


STAGE = ["-m", "pipeline.cli", "train-tokenizer", "--config", "tiny"]


def _kill_tree(pid: int) -> None:
    """kill -9 a launcher and every process under it (the workers may run in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(pid)
        victims = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for process in victims:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_tokenizer")
    shards = make_shards(root / "data", num_images=16, per_shard=8)
    fixed = make_shards(root / "fixed", num_images=2, per_shard=2)
    dirs = {name: root / name for name in ("single", "zero2", "killed", "zero1", "nan", "zero3")}
    logs = {name: root / f"{name}.log" for name in ("single", "zero2", "node0", "node1", "resume", "zero1", "nan",
                                                     "zero3")}
    pair = [f"data.shards={shards}", *PAIR]
    two = ACCELERATE + ["--num_processes", "2", "--use_deepspeed"]
    node = ACCELERATE + ["--num_processes", "2", "--num_machines", "2", "--main_process_ip", "127.0.0.1",
                         "--main_process_port", str(free_port()), "--rdzv_backend", "static", "--use_deepspeed",
                         "--zero_stage", "1", "--deepspeed_multinode_launcher", "standard"]
    killed = [*STAGE, f"run.dir={dirs['killed']}", *pair]
    procs = {
        "single": start_process([sys.executable, *STAGE, f"data.shards={fixed}", f"run.dir={dirs['single']}", *SINGLE],
                         logs["single"]),
        "zero2": start_process(two + ["--main_process_port", str(free_port()), "--zero_stage", "2", *STAGE,
                               f"run.dir={dirs['zero2']}", *pair], logs["zero2"]),
        "node0": start_process(node + ["--machine_rank", "0", *killed], logs["node0"]),
        "node1": start_process(node + ["--machine_rank", "1", *killed], logs["node1"]),
    }
    half = dirs["killed"] / "checkpoints" / f"step-{STEPS // 2}" / "meta.json"
    deadline = time.monotonic() + 500
    while not half.is_file() and time.monotonic() < deadline and procs["node0"].poll() is None:
        time.sleep(0.05)
    finished_before_kill = (dirs["killed"] / "checkpoints" / f"step-{STEPS}").exists()
    for name in ("node0", "node1"):
        _kill_tree(procs[name].pid)
    codes = {name: p.wait(timeout=500) for name, p in procs.items()}
    phase2 = {
        "resume": start_process(two + ["--main_process_port", str(free_port()), "--zero_stage", "1", *STAGE,
                                f"run.dir={dirs['killed']}", *pair, "--resume", "auto"], logs["resume"]),
        "zero1": start_process(two + ["--main_process_port", str(free_port()), "--zero_stage", "1", *STAGE,
                               f"run.dir={dirs['zero1']}", *pair], logs["zero1"]),
        "nan": start_process([sys.executable, *STAGE, f"data.shards={shards}", f"run.dir={dirs['nan']}", *SMALL,
                       "loss.rec_weight=1e38", "train.max_bad_steps=2", "train.max_steps=5"], logs["nan"]),
        "zero3": start_process([sys.executable, *STAGE, f"data.shards={shards}", f"run.dir={dirs['zero3']}", *SMALL,
                         "train.zero_stage=3"], logs["zero3"]),
    }
    codes.update({name: p.wait(timeout=500) for name, p in phase2.items()})
    return {"dirs": dirs, "logs": logs, "codes": codes, "shards": shards, "fixed": fixed,
            "finished_before_kill": finished_before_kill}


def _check(runs, *names):
    for name in names:
        assert runs["codes"][name] == 0, runs["logs"][name].read_text()[-4000:]


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def _initial_digests(shards: Path, overrides: list[str]) -> dict[str, str]:
    """Digests of the weights a run starts from (prepare() seeds and builds exactly as the stage does)."""
    from pipeline.config import load_config
    from pipeline.stages import TokenizerStageConfig
    from pipeline.train_tokenizer import prepare
    from pipeline.training import state_digest

    cfg = load_config(TokenizerStageConfig, "tiny", [f"data.shards={shards}", *overrides], kind="tokenizer")
    module = prepare(cfg, None).module
    return {"tokenizer": state_digest(module.tokenizer.state_dict()),
            "discriminator": state_digest(module.gan_loss.state_dict())}


# ------------------------------------------------------------------------------------------ launches
@pytest.mark.slow
def test_single_process_loss_decreases_on_a_fixed_batch(runs):
    _check(runs, "single")
    run_dir = runs["dirs"]["single"]
    rec = [m["loss/rec"] for m in _metrics(run_dir)]
    assert len(rec) == 24
    first, last = sum(rec[:4]) / 4, sum(rec[-4:]) / 4
    assert last < 0.8 * first, rec
    summary = _summary(run_dir)
    assert summary["steps"] == 24 and summary["world_size"] == 1 and summary["bad_steps"] == 0
    # disc_start beyond the run: the discriminator never ran, so it never changed.
    initial = _initial_digests(runs["fixed"], SINGLE)
    assert summary["ranks"][0]["digest_discriminator"] == initial["discriminator"]
    assert summary["ranks"][0]["digest_tokenizer"] != initial["tokenizer"]


@pytest.mark.slow
def test_zero2_two_processes_stay_in_sync_train_both_and_export(runs):
    from models.tokenizer import Tokenizer

    _check(runs, "zero2")
    run_dir = runs["dirs"]["zero2"]
    summary = _summary(run_dir)
    rank0, rank1 = summary["ranks"]
    assert summary["world_size"] == 2 and summary["zero_stage"] == 2 and summary["steps"] == STEPS
    assert rank0["digest_tokenizer"] == rank1["digest_tokenizer"]
    assert rank0["digest_discriminator"] == rank1["digest_discriminator"]
    initial = _initial_digests(runs["shards"], PAIR)
    assert rank0["digest_tokenizer"] != initial["tokenizer"]
    assert rank0["digest_discriminator"] != initial["discriminator"]

    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == [2, 4, 6]
    assert "loss/gan_d" not in metrics[0] and "loss/gan_d" in metrics[1]  # D starts at step 2
    for key in ("loss/rec", "loss/codebook", "perplexity/0", "perplexity/1", "usage/0", "usage/1", "share/level0",
                "share/level1", "codes_per_image", "grad_norm", "lr/tokenizer", "lr/discriminator", "images_per_s"):
        assert all(key in m for m in metrics), key
    assert all(abs(m["share/level0"] + m["share/level1"] - 1) < 1e-5 for m in metrics)
    assert sorted(p.name for p in (run_dir / "images").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    assert list((run_dir / "logs").rglob("events.out.tfevents*"))  # TensorBoard through Accelerate

    last = run_dir / "checkpoints" / f"step-{STEPS}"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-3", "step-6"]
    assert (last / "extra-rank00000.pt").is_file() and (last / "extra-rank00001.pt").is_file()
    tok = Tokenizer.from_pretrained(run_dir / "export")
    ema = load_file(str(last / "ema.safetensors"))
    assert all(torch.equal(tok.state_dict()[k], v) for k, v in ema.items())  # EMA weights exported
    images = torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    codes = tok.encode(images)
    assert len(codes) == 2 and codes[0].grain.shape == (2, 2) and codes[0].codes.shape[1] == 2
    assert codes[0].codes.shape[0] == int((4 ** codes[0].grain.long()).sum())


@pytest.mark.slow
def test_kill9_on_two_machines_then_resume_matches_the_straight_run(runs):
    """N steps straight == N/2 steps, kill -9, resume, N/2 steps: bit for bit, on the same ZeRO stage.

    The reference must be the same ZeRO stage and world size: ZeRO-1 sums a rank's micro-batches before
    the cross-rank reduction, ZeRO-2 reduces every micro-batch, so their gradients differ in the last bits.
    Biases feeding a GroupNorm have an exactly-zero true gradient (its rounding noise, ~1e-9) and AdamW turns
    noise of either sign into a step of about +-lr, so ZeRO-1 and ZeRO-2 runs drift apart by ~1e-4 in a few
    steps, kill or no kill. Against its own stage a resume has no excuse for any difference.
    """
    assert not runs["finished_before_kill"], "the killed run finished before the kill; the test proved nothing"
    assert runs["codes"]["node0"] != 0
    _check(runs, "resume", "zero1")
    killed, straight = runs["dirs"]["killed"], runs["dirs"]["zero1"]
    summary, reference = _summary(killed), _summary(straight)
    assert summary["resumed_from"] == STEPS // 2 and summary["zero_stage"] == 1 and summary["steps"] == STEPS
    assert reference["resumed_from"] == 0 and reference["zero_stage"] == 1
    # Every parameter and buffer of the whole training module (discriminator included), on every rank.
    for rank in range(2):
        for part in ("digest_tokenizer", "digest_discriminator"):
            assert summary["ranks"][rank][part] == reference["ranks"][0][part], (rank, part)
    # Before the kill (written by the 2-machine launch) and after the resume (the 2-process one).
    for step, name in ((STEPS // 2, "model.safetensors"), (STEPS, "model.safetensors"), (STEPS, "ema.safetensors")):
        resumed = load_file(str(killed / f"checkpoints/step-{step}" / name))
        expected = load_file(str(straight / f"checkpoints/step-{step}" / name))
        assert resumed.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=f"step {step} {name}:{key}")
    last, expected_last = _metrics(killed)[-1], _metrics(straight)[-1]
    assert last["step"] == expected_last["step"] == STEPS
    for key in ("loss/rec", "loss/gan_d", "grad_norm", "lr/tokenizer", "lr/discriminator"):
        assert last[key] == expected_last[key], key


@pytest.mark.slow
def test_nan_loss_stops_after_max_bad_steps_and_zero3_is_refused(runs):
    assert runs["codes"]["nan"] != 0
    log = runs["logs"]["nan"].read_text()
    assert "loss or gradient was NaN/Inf for 2 steps in a row" in log and "train.max_bad_steps=2" in log
    assert not (runs["dirs"]["nan"] / "checkpoints" / "step-1").exists()
    assert runs["codes"]["zero3"] == 2
    assert "ZeRO-3 is not supported for train-tokenizer" in runs["logs"]["zero3"].read_text()


@pytest.mark.slow
def test_resume_with_other_config_or_world_size_fails_before_training(runs, capsys, monkeypatch):
    from pipeline.cli import main

    pair = [f"data.shards={runs['shards']}", *PAIR, f"run.dir={runs['dirs']['zero2']}"]
    assert main(["train-tokenizer", "--config", "tiny", *pair, "optim.lr=5e-4"]) == 2
    err = capsys.readouterr().err
    assert "config differs (optim.lr: checkpoint 0.001, this run 0.0005)" in err
    assert "world size" not in err   # a ZeRO-2 checkpoint resumes on any world size that keeps the global batch
    # 2 processes x grad_accum 2 = 4 micro-batches per step: 3 processes cannot keep it (checked in prepare)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["train-tokenizer", "--config", "tiny", *pair, "train.max_steps=12"]) == 2
    err = capsys.readouterr().err
    assert "cannot be kept on 3 ranks: use a number of ranks in [1, 2, 4]" in err and "config differs" not in err
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # An `srun -n 2` task without torchrun is one of 2 (data.world): only the config differs.
    env = {**launch_env(), "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "0"}
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "train-tokenizer", "--config", "tiny", *pair,
                             "optim.lr=5e-4"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "config differs (optim.lr" in result.stderr, result.stderr[-3000:]
    assert "world size" not in result.stderr


def test_a_checkpoint_older_than_an_option_resumes_with_the_option_at_its_default(runs, tmp_path, capsys):
    """A checkpoint whose config identity predates ``model.router.entropy_prior`` (deleted from its meta.json,
    checksums rewritten) is compared as if it had the default: only real differences are refused."""
    import shutil

    from pipeline.checkpoint import complete_checkpoints, write_checksums
    from pipeline.cli import main

    run_dir = tmp_path / "older"
    shutil.copytree(runs["dirs"]["zero2"], run_dir)
    for _, step in complete_checkpoints(run_dir):
        meta = json.loads((step / "meta.json").read_text())
        del meta["config_identity"]["model"]["router"]["entropy_prior"]
        (step / "meta.json").write_text(json.dumps(meta))
        write_checksums(step)
    pair = [f"data.shards={runs['shards']}", *PAIR, f"run.dir={run_dir}"]
    assert main(["train-tokenizer", "--config", "tiny", *pair, "optim.lr=5e-4"]) == 2
    err = capsys.readouterr().err
    assert "config differs (optim.lr: checkpoint 0.001, this run 0.0005)" in err and "older varitok" not in err
    assert main(["train-tokenizer", "--config", "tiny", *pair, "model.router.entropy_prior=3"]) == 2
    assert "config differs (model.router.entropy_prior: checkpoint 0.0, this run 3.0)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize("overrides, message", [
    (["data.shards=' '"], "data.shards is empty"),
    (["data.shards=/nonexistent/x-{000000..000001}.tar"], "data.shards='/nonexistent/x-{000000..000001}.tar'"),
    (["train.bogus=1"], "train.bogus"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["loss.lpips_weight=1.0", "loss.lpips_weights=/nonexistent/lpips.safetensors"], "loss.lpips_weights"),
])
def test_bad_inputs_fail_before_training(overrides, message, tmp_path, capsys):
    from pipeline.cli import main

    shards = make_shards(tmp_path, num_images=2, per_shard=2)
    args = ["train-tokenizer", "--config", "tiny", f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", *SMALL,
            *overrides]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_teacher_weights_name_the_config_key(tmp_path, capsys):
    from pipeline.cli import main

    config = OmegaConf.load(REPO / "configs/tokenizer/tiny.yaml")
    config.model.teachers = [{"name": "dino", "backend": "timm", "weights": str(tmp_path / "missing.safetensors")}]
    OmegaConf.save(config, tmp_path / "with_teacher.yaml")
    shards = make_shards(tmp_path, num_images=2, per_shard=2)
    assert main(["train-tokenizer", "--config", str(tmp_path / "with_teacher.yaml"), f"data.shards={shards}",
                 f"run.dir={tmp_path / 'run'}", *SMALL]) == 2
    assert "model.teachers[0].weights" in capsys.readouterr().err


def test_nonfinite_guard_counts_and_resets():
    from pipeline.training import NonFiniteGuard

    guard = NonFiniteGuard(limit=3)
    for step, bad in enumerate([True, True, False, True, True]):
        guard.record(bad, step)
    assert guard.total == 4 and guard.in_a_row == 2
    with pytest.raises(FloatingPointError, match="3 steps in a row"):
        guard.record(True, 5)


def test_calibrate_entropy_gives_the_requested_share_through_the_router(tmp_path, capsys):
    from data.stream import ShardStream
    from models.tokenizer.router import Router, RouterConfig
    from pipeline.calibrate import inline_entropy_table
    from pipeline.cli import main

    shards = make_shards(tmp_path, num_images=10, per_shard=4)
    out = tmp_path / "thresholds.json"
    assert main(["calibrate-entropy", "--shards", str(shards), "--config", "tiny", "--ratios", "0.25",
                 "--max-images", "8", "--out", str(out), f"data.image_size={SIZE}"]) == 0
    table = json.loads(out.read_text())
    assert table["num_images"] == 8 and table["num_regions"] == 8 * 4 and table["region_size"] == 16
    assert table["achieved_shares"] == [0.25]
    # The tokenizer's entropy router, configured from the file, routes 25% of those regions to the fine level.
    config = inline_entropy_table(RouterConfig(mode="entropy", targets=[0.25], entropy_table=str(out)), 16)
    router = Router(config, [8, 16], z_channels=1)
    stream = ShardStream(shards, 8, SIZE, rank=0, world_size=1, shuffle=False, crop="center", flip=False)
    images = next(iter(stream))["image"]
    route = router([torch.zeros(8, 1, 2, 2)], images)
    assert route.shares.tolist() == [0.75, 0.25]
    assert main(["calibrate-entropy", "--shards", str(tmp_path / "none"), "--config", "tiny", "--out",
                 str(tmp_path / "x.json")]) == 2
    assert "--shards" in capsys.readouterr().err


@pytest.mark.slow
def test_zero2_equals_zero0_over_the_first_steps(tmp_path):
    """2 processes, same seed and batches: ZeRO-2 and ZeRO-0 give the same losses, per-model gradient norms
    (the discriminator's from step 3 on) over the first 3 steps to 1e-5 relative (measured: 3e-7), and weights
    after step 2 to 1e-5 of each tensor's largest value.

    Not bit for bit: ZeRO-2 all-reduces the partial squared norms of its gradient partitions, so the clip
    coefficient differs in the last bit from ZeRO-0's one-sum norm. Adam turns an element's near-zero gradient of
    either sign into a step of about +-lr (a codebook entry moved by one lr at step 3), and from step 4 on a code
    assignment or a hard Gumbel gate near a tie flips: the runs then drift apart chaotically (1e-4 .. 4e-3 at
    step 4).
    """
    shards = make_shards(tmp_path / "data", num_images=16, per_shard=8)
    common = [f"data.shards={shards}", *SMALL, "train.max_steps=3", "train.log_every=1", "train.ckpt_every=2",
              "train.keep_last=2", "train.image_every=100", "loss.disc_start=2", "train.ema_decay=0"]
    procs = {stage: start_process(ACCELERATE + ["--num_processes", "2", "--use_deepspeed", "--main_process_port",
                                                str(free_port()), "--zero_stage", str(stage), *STAGE,
                                                f"run.dir={tmp_path / f'zero{stage}'}", *common],
                                  tmp_path / f"zero{stage}.log") for stage in (0, 2)}
    for stage, proc in procs.items():
        assert proc.wait(timeout=600) == 0, (tmp_path / f"zero{stage}.log").read_text()[-4000:]
    zero0, zero2 = (_metrics(tmp_path / f"zero{stage}") for stage in (0, 2))
    assert [m["step"] for m in zero0] == [m["step"] for m in zero2] == [1, 2, 3]
    assert "loss/gan_d" not in zero0[1] and "loss/gan_d" in zero0[2]
    assert zero0[0]["grad_norm/tokenizer"] > 1.0    # unclipped norms are logged (DeepSpeed's own clip is off)
    for a, b in zip(zero0, zero2):
        keys = ["loss/total", "loss/rec", "loss/codebook", "loss/entropy", "grad_norm/tokenizer"]
        keys += ["loss/gan_d", "grad_norm/discriminator"] if a["step"] > 2 else []
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["step"], key, a[key], b[key])
    weights0, weights2 = (load_file(str(tmp_path / f"zero{stage}/checkpoints/step-2/model.safetensors"))
                          for stage in (0, 2))
    assert weights0.keys() == weights2.keys()
    for key, value in weights0.items():
        gap = float((weights2[key] - value).abs().max())
        assert gap <= 1e-5 * float(value.abs().max()) + 1e-7, (key, gap)


def test_ema_warmup_decay_follows_one_plus_n_over_ten_plus_n():
    """With warmup the n-th update uses min(decay, (1 + n) / (10 + n)): after 1000 steps at decay 0.999 the
    initial weights keep a 1e-3-ish share instead of 0.999^1000 = 37%."""
    from pipeline.ema import EMA

    param = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([param], decay=0.999, warmup=True)
    with torch.no_grad():
        param.fill_(1.0)
    ema.update()
    assert ema.current_decay() == pytest.approx(2 / 11) and float(ema.shadow[0]) == pytest.approx(9 / 11)
    for _ in range(999):
        ema.update()
    assert 1 - float(ema.shadow[0]) < 0.01            # the initial 0 is (nearly) forgotten
    plain = EMA([param], decay=0.999)
    with torch.no_grad():
        param.zero_()
    plain.shadow[0].zero_()
    with torch.no_grad():
        param.fill_(1.0)
    for _ in range(1000):
        plain.update()
    assert float(plain.shadow[0]) == pytest.approx(1 - 0.999 ** 1000, rel=1e-4)


@pytest.mark.slow
def test_ema_codebooks_and_kmeans_init_under_zero2_resume_exactly(tmp_path):
    """2 processes, ZeRO-2, EMA codebooks with dead-code restart and k-means init: the ranks end with the same
    weights and EMA buffers, and 2 steps + resume from the step-2 checkpoint + 2 steps equals 4 steps straight,
    bit for bit (EMA buffers, codebooks and restart draws included). With gradient-updated codebooks the k-means
    init survives ZeRO-2's fp32 copies (after one step the codes are still unit vectors, not U(-1/V, 1/V))."""
    shards = make_shards(tmp_path / "data", num_images=16, per_shard=8)
    common = [f"data.shards={shards}", *SMALL, "train.max_steps=4", "train.log_every=1", "train.ckpt_every=2",
              "train.keep_last=3", "train.image_every=100", "loss.disc_start=1000", "train.ema_decay=0",
              "model.quantizer.codebook_init=kmeans"]
    ema = ["model.quantizer.codebook_update=ema", "model.quantizer.dead_code_threshold=1.0"]
    two = ACCELERATE + ["--num_processes", "2", "--use_deepspeed", "--zero_stage", "2"]
    straight, resumed, gradient = (tmp_path / name for name in ("straight", "resumed", "gradient"))
    procs = {"straight": start_process(two + ["--main_process_port", str(free_port()), *STAGE, f"run.dir={straight}",
                                              *common, *ema], tmp_path / "straight.log"),
             "gradient": start_process(two + ["--main_process_port", str(free_port()), *STAGE, f"run.dir={gradient}",
                                              *common, "train.max_steps=1"], tmp_path / "gradient.log")}
    for name, proc in procs.items():
        assert proc.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    resume = start_process(two + ["--main_process_port", str(free_port()), *STAGE, f"run.dir={resumed}", *common,
                                  *ema, "--resume", str(straight / "checkpoints" / "step-2")], tmp_path / "resumed.log")
    assert resume.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-4000:]

    summary = _summary(straight)
    assert summary["zero_stage"] == 2 and summary["steps"] == 4
    assert summary["ranks"][0]["digest_tokenizer"] == summary["ranks"][1]["digest_tokenizer"]
    assert _summary(resumed)["resumed_from"] == 2
    expected = load_file(str(straight / "checkpoints/step-4/model.safetensors"))
    got = load_file(str(resumed / "checkpoints/step-4/model.safetensors"))
    assert {"quantizer.ema_count_0", "quantizer.ema_sum_1"} <= set(expected) and got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    codes = expected["quantizer.codebooks.0"]
    assert torch.allclose(codes.norm(dim=1), torch.ones(codes.shape[0]), atol=1e-5)
    restarted = expected["quantizer.ema_count_0"] == 1.0
    assert 0 < int(restarted.sum()) < codes.shape[0]
    after_one_step = load_file(str(gradient / "checkpoints/step-1/model.safetensors"))["quantizer.codebooks.0"]
    assert float(after_one_step.norm(dim=1).min()) > 0.9
