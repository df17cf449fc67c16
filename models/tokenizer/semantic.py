"""Semantic alignment of sub-codebooks to frozen teachers (FQGAN): heads and losses.

A :class:`SemanticHead` reads one quantized sub-codebook map and predicts the teacher's pooled feature
(and, optionally, its patch features). Positions are 2D sin-cos embeddings computed for the grid at hand,
so any input resolution works (the official code hard-codes the 256px grid).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data.world import process_group_size


def sincos_2d(height: int, width: int, dim: int, device: torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2D sin-cos position embedding, (height*width) x dim, raster order (row-major).

    The first dim/2 channels encode the row, the rest the column, each as [sin(p w_k), cos(p w_k)] with
    w_k = 10000^(-k / (dim/4)). ``dim`` must be divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (10000.0 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freqs  # h x quarter
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freqs   # w x quarter
    row_emb = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col_emb = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_emb, col_emb], dim=-1).reshape(height * width, dim).to(dtype)


class SemanticHead(nn.Module):
    """FQGAN alignment head: q (B x C x h x w) -> (pooled B x out_dim, patches B x h*w x out_dim).

    Per-position MLP C -> width, a learned CLS token, 2D sin-cos positions for the (h, w) of the input,
    ``depth`` pre-LN transformer blocks, final LayerNorm, linear projection to the teacher width.
    """

    def __init__(self, in_dim: int, out_dim: int, width: int = 256, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"SemanticHead width {width} must be divisible by heads {heads}")
        self.width = width
        self.embed = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, _, height, width = q.shape
        tokens = self.embed(q.flatten(2).transpose(1, 2))  # B x hw x W
        tokens = tokens + sincos_2d(height, width, self.width, q.device, tokens.dtype)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        out = self.proj(self.norm(self.blocks(tokens)))
        return out[:, 0], out[:, 1:]


def _gather_batch(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows concatenated (autograd flows back to each rank's rows) and this rank's offset.

    Every rank must hold the same number of rows.
    """
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public autograd gather
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        parts = all_gather(x)
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float | torch.Tensor,
             gather: bool = True, symmetric: bool = True) -> torch.Tensor:
    """InfoNCE between l2-normalised rows of ``pred`` and ``target`` (both B x D).

    logits[i, j] = <p_i, t_j> / temperature; symmetric: loss = (CE(pred -> targets) + CE(target -> preds)) / 2;
    else FQGAN's one-directional CE(pred -> targets) (each prediction picks its teacher feature among the
    batch's). Averaged over this rank's rows. The one-directional form gives the prediction no gradient when
    the teacher's features are all alike (random-weight teachers), while the target -> preds term then pushes
    every image's prediction to the same point, i.e. the codes towards image-invariance. When torch.distributed
    is initialised and ``gather`` is true, the negatives are the GLOBAL batch (every rank's rows, same B on every
    rank); the mean of the per-rank losses then equals the single-process loss on the concatenated batch, and the
    gradients reaching each rank (sum over ranks through all_gather's backward, then averaged by DDP/ZeRO) match it
    too.
    """
    with torch.autocast(device_type=pred.device.type, enabled=False):   # similarities and softmax in fp32
        pred = F.normalize(pred.float(), dim=-1)
        target = F.normalize(target.float(), dim=-1)
        if gather and process_group_size() > 1:
            all_pred, offset = _gather_batch(pred)
            all_target, _ = _gather_batch(target)
        else:
            all_pred, all_target, offset = pred, target, 0
        labels = torch.arange(pred.shape[0], device=pred.device) + offset
        loss_pred = F.cross_entropy(pred @ all_target.T / temperature, labels)
        if not symmetric:
            return loss_pred
        loss_target = F.cross_entropy(target @ all_pred.T / temperature, labels)
        return 0.5 * (loss_pred + loss_target)


def _as_hw(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def patch_alignment_loss(pred: torch.Tensor, target: torch.Tensor, grid_pred: int | tuple[int, int],
                         grid_target: int | tuple[int, int]) -> torch.Tensor:
    """1 - mean cosine between predicted and teacher patch features.

    pred: B x N x D on a ``grid_pred`` grid (N = h*w, raster order), bilinearly resized to the teacher's
    ``grid_target`` grid; target: B x M x D (M = h'*w').
    """
    (h, w), (ht, wt) = _as_hw(grid_pred), _as_hw(grid_target)
    if target.shape[1] == 0 or pred.shape[1] != h * w or target.shape[1] != ht * wt:
        raise ValueError(f"patch_alignment_loss: pred has {pred.shape[1]} tokens for grid {(h, w)} and target "
                         f"{target.shape[1]} for grid {(ht, wt)}; the teacher must expose patch tokens")
    with torch.autocast(device_type=pred.device.type, enabled=False):
        pred_map = pred.transpose(1, 2).reshape(pred.shape[0], pred.shape[2], h, w).float()
        if (h, w) != (ht, wt):
            pred_map = F.interpolate(pred_map, size=(ht, wt), mode="bilinear", align_corners=False)
        cosine = F.cosine_similarity(pred_map.flatten(2), target.float().transpose(1, 2), dim=1)
        return 1.0 - cosine.mean()
