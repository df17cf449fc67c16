"""Grids, overlays and the report writer."""
import numpy as np
import torch

from pipeline.report import Report
from pipeline.visual import grain_overlay, image_grid, save_png, tile, to_uint8


def test_overlay_tints_only_fine_regions_and_draws_borders():
    images = torch.zeros(1, 3, 8, 8)
    grain = torch.tensor([[[0, 1], [0, 0]]])
    out = grain_overlay(images, grain, alpha=0.5)
    assert torch.equal(out[0, :, 1:4, 1:4], images[0, :, 1:4, 1:4])      # coarse region interior unchanged
    assert not torch.equal(out[0, :, 1:4, 5:8], images[0, :, 1:4, 5:8])  # fine region tinted
    assert torch.all(out[0, :, 0, :] == 1) and torch.all(out[0, :, :, 4] == 1)  # borders


def test_grid_layout_and_uint8_conversion():
    a, b = -torch.ones(3, 3, 4, 5), torch.ones(3, 3, 4, 5)
    grid = image_grid([a, b], pad=1)
    assert grid.shape == (3 * 6, 2 * 7, 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 8, 0] == 255
    assert tile(a, ncol=2, pad=0).shape == (8, 10, 3)
    assert to_uint8(torch.zeros(1, 3, 2, 2))[0, 0, 0, 0] == 128


def test_report_writes_markdown_and_html(tmp_path):
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "img" / "x.png")
    report = Report("demo")
    section = report.section("stage").command("varitok shard --input x").figures({"PSNR": 21.234567})
    section.image(tmp_path / "img" / "x.png", "cap")
    md, html = report.write(tmp_path)
    text = md.read_text()
    assert "varitok shard --input x" in text and "21.23" in text and "img/x.png" in text
    assert "<img src='img/x.png'>" in html.read_text()
