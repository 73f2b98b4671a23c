"""frames.py: the frame-size check, media files -> frames, the attention grid and the one overlay."""

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from frames import CMAP, OVERLAY_ALPHA, attention_grid, check_frame_size, overlay, read_media
from media import encode_jpeg


def test_frame_size_must_be_a_positive_multiple_of_the_patch():
    check_frame_size(224, 14)
    with pytest.raises(ValueError, match="frame size 100 is not a multiple of the vision backbone's 14-px patches"):
        check_frame_size(100, 14)
    with pytest.raises(KeyError, match="--frame-size 7 is not a multiple"):
        check_frame_size(7, 14, "--frame-size 7", KeyError)


def test_heatmaps_sit_on_their_patch():
    """A map peaked at patch (row 0, last column) colours the top-right block of the frame, and only it."""
    frame = np.full((56, 56, 3), 128, np.uint8)
    heat = np.zeros((4, 4))
    heat[0, 3] = 1.0
    image = overlay(frame, heat, vmax=1.0)
    cmap = colormaps[CMAP]
    hot = OVERLAY_ALPHA * np.array(cmap(1.0)[:3]) * 255 + (1 - OVERLAY_ALPHA) * 128
    cold = OVERLAY_ALPHA * np.array(cmap(0.0)[:3]) * 255 + (1 - OVERLAY_ALPHA) * 128
    assert np.abs(image[:14, 42:] - hot).max() <= 1 and np.abs(image[14:, :42] - cold).max() <= 1
    assert np.abs(image[:14, :42] - cold).max() <= 1


def test_the_remainder_past_the_last_patch_is_left_as_it_is():
    frame = np.full((59, 59, 3), 128, np.uint8)  # 59 // 4 = 14-px patches: 4 x 4 of them cover 56 px
    image = overlay(frame, np.ones((4, 4)), vmax=1.0)
    assert (image[56:] == 128).all() and (image[:, 56:] == 128).all() and (image[:56, :56] != 128).any()


def test_attention_grid_is_the_last_block_over_the_patches():
    attn = torch.zeros(2, 3, 2, 1 + 4)  # [T, blocks, heads, keys]: one prefix key, 2 x 2 patches
    attn[:, -1, :, 2] = 1.0  # the last block looks at patch (0, 1)
    attn[:, 0, :, 4] = 1.0  # an earlier block is left out
    grid = attention_grid(attn, prefix=1, grid=(2, 2))
    assert grid.shape == (2, 2, 2) and grid[:, 0, 1].eq(1).all() and grid.sum() == 2
    with pytest.raises(ValueError, match="attention has 5 keys; expected 1 prefix \\+ 3 x 3 patches"):
        attention_grid(attn, prefix=1, grid=(3, 3))


def test_read_media_reads_an_image_by_its_suffix_or_its_content(tmp_path):
    jpeg = encode_jpeg(torch.full((3, 32, 32), 200, dtype=torch.uint8))
    for name in ("a.jpg", "a.unusual"):
        (tmp_path / name).write_bytes(jpeg)
        assert read_media(tmp_path / name, 8, 28).shape == (3, 28, 28)
