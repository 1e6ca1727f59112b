"""``blockwise``: BEiT's block-wise masking. Masks are unions of rectangles placed by BEiT's
rules, topped up to the contract's exact count."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import assert_user_error, maskkit
from helpers import write_medmnist_npz

from maskkit.errors import PluginError
from maskkit.plugins import create_policy
from maskkit.policy import MaskBatch, PolicyContext, validate_decision
from maskkit_plugins.blockwise import default_min_block_patches, rectangles, sample_blocks


def context(grid: int) -> PolicyContext:
    return PolicyContext(num_patches=grid * grid, embed_dim=4, grid_size=grid, patch_size=4)


def batch(grid: int, ratio: float, size: int = 64) -> MaskBatch:
    return MaskBatch(
        images=torch.zeros(size, 3, 4, 4), tokens=torch.zeros(size, grid * grid, 4), mask_ratio=ratio
    )


@pytest.mark.parametrize(("grid", "quota", "smallest"), [(4, 12, 1), (8, 48, 5), (8, 25, 5), (14, 75, 16)])
def test_the_blocks_are_rectangles_placed_by_beits_rules(grid, quota, smallest):
    torch.manual_seed(0)
    sample = sample_blocks(64, grid, quota, smallest, quota, (0.3, 1 / 0.3))
    placed = sample.blocks[..., 2] > 0  # [B, R]
    assert bool(placed.any(dim=1).all())  # every image got blocks
    # The mask is exactly the union of the recorded rectangles, each inside the grid.
    union = (rectangles(sample.blocks, grid) & placed[..., None, None]).any(dim=1)
    assert torch.equal(union, sample.mask)
    top, left, height, width = sample.blocks[placed].unbind(-1)
    assert bool(((height < grid) & (width < grid) & (height >= 1) & (width >= 1)).all())  # strictly smaller
    assert bool(((top >= 0) & (left >= 0) & (top + height <= grid) & (left + width <= grid)).all())
    # Never more than the quota; each block added new patches, never more than what was left.
    counts = sample.mask.flatten(1).sum(dim=1)
    assert bool((counts <= quota).all())
    before = torch.zeros(64, grid, grid, dtype=torch.bool)
    for round_index in range(sample.blocks.shape[1]):
        block = rectangles(sample.blocks[:, round_index], grid) & placed[:, round_index, None, None]
        added = (block & ~before).flatten(1).sum(dim=1)
        assert bool((added[placed[:, round_index]] > 0).all())
        left_before = quota - before.flatten(1).sum(dim=1)
        assert bool((added <= left_before).all())
        before |= block
    # BEiT's placement covers almost all of its quota; the policy tops up the rest.
    assert counts.float().mean() > 0.9 * quota


def test_forced_block_shapes_follow_the_options():
    # With fewer patches left than the minimum, BEiT draws the area between the two, so the last
    # blocks of an image may be smaller; every other block has exactly the forced shape.
    torch.manual_seed(1)
    squares = sample_blocks(32, 14, 75, 16, 16, (1.0, 1.0))  # BEiT's grid; 4×4 blocks
    shapes = squares.blocks[squares.blocks[..., 2] > 0][:, 2:]
    assert bool((shapes[:, 0] == shapes[:, 1]).all()) and bool((shapes <= 4).all())
    assert float((shapes == 4).all(dim=1).float().mean()) > 0.7
    tall = sample_blocks(32, 14, 75, 12, 12, (3.0, 3.0))  # area 12 at aspect 3: 6 high, 2 wide
    shapes = tall.blocks[tall.blocks[..., 2] > 0][:, 2:]
    assert bool((shapes[:, 0] >= 2 * shapes[:, 1]).all())
    assert float((shapes == torch.tensor([6, 2])).all(dim=1).float().mean()) > 0.7


@pytest.mark.parametrize(("grid", "ratio"), [(4, 0.75), (8, 0.75), (8, 0.4), (14, 0.4), (16, 0.9), (8, 0.0)])
def test_every_image_masks_exactly_the_contracts_count_and_keeps_its_blocks(grid, ratio):
    torch.manual_seed(2)
    policy = create_policy("blockwise", context(grid))
    masks = batch(grid, ratio)
    quota = grid * grid - masks.num_keep
    torch.manual_seed(3)
    blocks = policy.blocks(64, quota, torch.device("cpu")).mask.flatten(1)
    torch.manual_seed(3)
    decision = policy(masks)
    validate_decision(decision, masks, "blockwise")
    assert bool((decision.mask.sum(dim=1) == quota).all())
    assert bool((decision.mask[blocks] == 1).all())  # the blocks are masked; random patches top up


def _masked_neighbour_pairs(mask: torch.Tensor, grid: int) -> float:
    """Mean count per image of horizontally or vertically adjacent pairs that are both masked."""
    cells = mask.view(-1, grid, grid)
    pairs = (cells[:, 1:, :] * cells[:, :-1, :]).sum(dim=(1, 2)) + (cells[:, :, 1:] * cells[:, :, :-1]).sum(
        dim=(1, 2)
    )
    return float(pairs.mean())


def test_block_masks_are_clustered_where_random_masks_are_not():
    torch.manual_seed(4)
    masks = batch(8, 0.4, size=256)  # BEiT's ratio on the cpu preset's grid
    block = _masked_neighbour_pairs(create_policy("blockwise", context(8))(masks).mask, 8)
    scattered = _masked_neighbour_pairs(create_policy("random", context(8))(masks).mask, 8)
    # 112 adjacent pairs on an 8×8 grid; random masks of 25 patches join about 17 of them.
    assert scattered == pytest.approx(112 * 25 * 24 / (64 * 63), rel=0.1)
    assert block > 1.8 * scattered


def test_the_default_minimum_block_keeps_beits_share_of_the_image():
    assert [default_min_block_patches(g * g) for g in (4, 8, 14, 16)] == [1, 5, 16, 21]
    assert create_policy("blockwise", context(8)).min_block_patches == 5
    assert create_policy("blockwise", context(8), {"min_block_patches": 2}).min_block_patches == 2


def test_draws_follow_the_seed():
    policy = create_policy("blockwise", context(8))
    masks = batch(8, 0.75)
    torch.manual_seed(5)
    first = policy(masks).mask
    torch.manual_seed(5)
    assert torch.equal(first, policy(masks).mask)
    assert not torch.equal(first, policy(masks).mask)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"min_block_patches": 0}, "min_block_patches must be in [1, 64]"),
        ({"min_block_patches": 2.5}, "min_block_patches must be an integer"),
        ({"min_block_patches": 8, "max_block_patches": 4}, "max_block_patches must be an integer >= "),
        ({"min_aspect": 0}, "min_aspect must be a number > 0"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "max_aspect must be a number >= min_aspect"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, fragment):
    with pytest.raises(PluginError) as caught:
        create_policy("blockwise", context(8), options)
    assert fragment in str(caught.value) and "'blockwise'" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_option_on_the_command_line_is_one_error_line(tmp_path):
    write_medmnist_npz(tmp_path / "dermamnist.npz")
    result = maskkit(
        "train", "--policy", "blockwise", "--preset", "smoke", "--data-dir", tmp_path,
        "--set", "policy_options.min_aspect=-1", "--run-dir", tmp_path / "run",
    )  # fmt: skip
    assert_user_error(result, "'blockwise'", "min_aspect must be a number > 0")
    assert not (tmp_path / "run").exists()
