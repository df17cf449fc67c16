"""Semantic teachers (open_clip / timm / hf from local files), alignment heads, InfoNCE, patch loss."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from models.tokenizer.semantic import SemanticHead, info_nce, patch_alignment_loss, sincos_2d
from models.tokenizer.teachers import FrozenTeacher, TeacherConfig, build_teacher

TINY_CLIP = {"embed_dim": 24,
             "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "patch_size": 14, "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}}
TINY_DINO = {"depth": 2, "embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A tiny open_clip ViT registered under its own name, random weights saved as safetensors."""
    import open_clip

    root = tmp_path_factory.mktemp("clip")
    config = root / "varitok-tiny-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model("varitok-tiny-clip")
    path = root / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


@pytest.fixture(scope="module")
def dino_weights(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A 2-block timm vit_small_patch14_dinov2 at 56px, random weights saved with torch.save."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", img_size=56, num_classes=0, **TINY_DINO).eval()
    path = tmp_path_factory.mktemp("dino") / "dino.pth"
    torch.save(net.state_dict(), path)
    return path, net


def _images(batch: int = 2, size: int = 40) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _assert_frozen(teacher: FrozenTeacher) -> None:
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    images = _images().requires_grad_(True)
    pooled, patches = teacher(images)
    assert not pooled.requires_grad and not patches.requires_grad


def test_open_clip_teacher_loads_saved_weights(clip_weights):
    path, model = clip_weights
    cfg = TeacherConfig(name="clip", backend="open_clip", arch="varitok-tiny-clip", weights=str(path),
                        image_size=56)
    teacher = build_teacher(cfg)
    assert (teacher.embed_dim, teacher.grid) == (24, 4)
    images = _images()
    pooled, patches = teacher(images)
    assert pooled.shape == (2, 24) and patches.shape == (2, 16, 24)
    with torch.no_grad():
        expected = model.encode_image(teacher.preprocess(images))
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    torch.testing.assert_close(teacher.mean, mean)
    _assert_frozen(teacher)


def test_timm_dinov2_teacher_loads_saved_weights(dino_weights):
    path, net = dino_weights
    cfg = TeacherConfig(backend="timm", arch="vit_small_patch14_dinov2", weights=str(path), image_size=56,
                        model_kwargs=TINY_DINO)
    teacher = build_teacher(cfg)
    assert (teacher.embed_dim, teacher.grid) == (48, 4)
    images = _images()
    pooled, patches = teacher(images)
    assert pooled.shape == (2, 48) and patches.shape == (2, 16, 48)
    with torch.no_grad():
        tokens = net.forward_features(teacher.preprocess(images))
    torch.testing.assert_close(pooled, tokens[:, 0])
    torch.testing.assert_close(patches, tokens[:, 1:])
    _assert_frozen(teacher)
    # timm's checkpoint filter resamples the position embedding for another teacher resolution
    small = build_teacher(TeacherConfig(backend="timm", weights=str(path), image_size=28, model_kwargs=TINY_DINO))
    assert small.grid == 2 and small(images)[1].shape == (2, 4, 48)


def test_hf_dinov2_teacher_from_local_directory(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    net = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, patch_size=14, image_size=28)).eval()
    net.save_pretrained(tmp_path / "dinov2")
    teacher = build_teacher(TeacherConfig(backend="hf", weights=str(tmp_path / "dinov2"), image_size=28))
    images = _images()
    pooled, patches = teacher(images)
    assert pooled.shape == (2, 32) and patches.shape == (2, 4, 32) and teacher.grid == 2
    with torch.no_grad():
        out = net(pixel_values=teacher.preprocess(images))
    torch.testing.assert_close(pooled, out.pooler_output)
    _assert_frozen(teacher)


@pytest.mark.parametrize("weights", ["", "/nonexistent/dinov2.pth"])
def test_missing_weights_error_names_the_config_key(weights):
    cfg = TeacherConfig(backend="timm", weights=weights, model_kwargs=TINY_DINO)
    with pytest.raises(FileNotFoundError) as info:
        build_teacher(cfg, key_path="model.teachers[1]")
    message = str(info.value)
    assert "model.teachers[1].weights" in message
    assert (weights or "(empty)") in message


def test_random_init_is_explicit_and_teacher_stays_out_of_checkpoints():
    teacher = build_teacher(TeacherConfig(backend="timm", image_size=28, model_kwargs=TINY_DINO),
                            random_init=True)
    holder = nn.ModuleDict({"teacher": teacher, "head": nn.Linear(2, 2)})
    state = holder.state_dict()
    assert set(state) == {"head.weight", "head.bias"}
    before = {k: v.clone() for k, v in teacher.network.state_dict().items()}
    holder.load_state_dict(state, strict=True)  # teacher keys absent: still strict-loadable
    for key, value in teacher.network.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_preprocess_resize_is_antialiased():
    teacher = build_teacher(TeacherConfig(backend="timm", image_size=28, model_kwargs=TINY_DINO),
                            random_init=True)
    yy, xx = torch.meshgrid(torch.arange(112), torch.arange(112), indexing="ij")
    checker = ((yy + xx) % 2).float().mul(2).sub(1).expand(1, 3, 112, 112)  # 1-pixel checkerboard, [-1, 1]
    unit = teacher.preprocess(checker) * teacher.std + teacher.mean     # back to [0, 1]
    # an antialiased 4x reduction averages the checkerboard to grey; nearest/plain bilinear keeps 0/1 extremes
    assert unit.shape == (1, 3, 28, 28)
    assert (unit - 0.5).abs().max() < 0.05


def test_info_nce_hand_computed():
    pred = torch.tensor([[3.0, 0.0], [0.0, 2.0]])            # normalises to e1, e2
    target = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5

    def ce(logits: list[float], label: int) -> float:
        return -logits[label] + math.log(sum(math.exp(v) for v in logits))

    forward = ce([2.0, 1.2], 0) + ce([0.0, 1.6], 1)
    backward = ce([2.0, 0.0], 0) + ce([1.2, 1.6], 1)
    expected = 0.5 * (forward / 2 + backward / 2)
    assert info_nce(pred, target, t).item() == pytest.approx(expected, rel=1e-6)
    learned = torch.tensor(t, requires_grad=True)
    info_nce(pred, target, learned).backward()
    assert learned.grad is not None and learned.grad.abs() > 0


def _info_nce_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred_all, target_all = _distributed_batch()
        rows = slice(rank * 3, (rank + 1) * 3)
        pred = pred_all[rows].clone().requires_grad_(True)
        loss = info_nce(pred, target_all[rows], 0.3)
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": pred.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _distributed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)


@pytest.mark.slow
def test_info_nce_gathers_negatives_across_two_processes(tmp_path):
    mp.spawn(_info_nce_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    pred, target = _distributed_batch()
    pred.requires_grad_(True)
    single = info_nce(pred, target, 0.3)
    single.backward()
    torch.testing.assert_close((results[0]["loss"] + results[1]["loss"]) / 2, single.detach())
    # each rank's gradient = world x the global-loss gradient of its rows (DDP then averages over ranks)
    torch.testing.assert_close(torch.cat([r["grad"] for r in results]), 2 * pred.grad)
    # and it differs from per-rank negatives only
    local = info_nce(pred.detach()[:3], target[:3], 0.3)
    assert not torch.allclose(local, results[0]["loss"])


def test_sincos_positions_distinct_and_grid_general():
    emb = sincos_2d(3, 5, 8)
    assert emb.shape == (15, 8)
    assert torch.cdist(emb, emb).add(torch.eye(15)).min() > 1e-3  # every position has its own code
    torch.testing.assert_close(emb[6, :4], emb[7, :4])             # same row -> same row half
    with pytest.raises(ValueError):
        sincos_2d(2, 2, 6)


@pytest.mark.parametrize("grid", [(4, 4), (6, 3)])
def test_semantic_head_any_grid(grid):
    head = SemanticHead(in_dim=8, out_dim=24, width=32, depth=2, heads=4)
    q = torch.randn(2, 8, *grid, requires_grad=True)
    pooled, patches = head(q)
    assert pooled.shape == (2, 24) and patches.shape == (2, grid[0] * grid[1], 24)
    (pooled.square().sum() + patches.square().sum()).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    # without positions the CLS output would be invariant to permuting the grid
    flipped, _ = head(q.detach().flip(-1))
    assert not torch.allclose(flipped, pooled.detach(), atol=1e-5)


def test_patch_alignment_loss_resizes_prediction_grid():
    target = F.normalize(torch.randn(2, 16, 6), dim=-1)              # teacher grid 4x4
    pred_map = target.transpose(1, 2).reshape(2, 6, 4, 4)
    coarse = F.avg_pool2d(pred_map, 2)                               # a 2x2 prediction grid
    assert patch_alignment_loss(target * 3, target, 4, 4).item() == pytest.approx(0.0, abs=1e-6)
    assert patch_alignment_loss(-target, target, 4, 4).item() == pytest.approx(2.0, abs=1e-6)
    up = F.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False)
    expected = 1 - F.cosine_similarity(up.flatten(2), target.transpose(1, 2), dim=1).mean()
    loss = patch_alignment_loss(coarse.flatten(2).transpose(1, 2), target, 2, (4, 4))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    with pytest.raises(ValueError, match="patch tokens"):
        patch_alignment_loss(target, target[:, :0], 4, 0)


def test_open_clip_teacher_from_model_config_json(tmp_path):
    """`arch` may be a model-config JSON path, so every process can build a custom (small) CLIP."""
    config = tmp_path / "varitok-json-clip.json"
    config.write_text(json.dumps(TINY_CLIP))
    teacher = build_teacher(TeacherConfig(name="clip", backend="open_clip", arch=str(config), image_size=56),
                            random_init=True)
    pooled, patches = teacher(_images())
    assert pooled.shape == (2, 24) and patches.shape == (2, 16, 24)
