"""A small synthetic dataset in the ADE20K (ADEChallengeData2016) layout.

Written for end-to-end tests of the segmentation configs: it is read by mmseg's
``ADE20KDataset`` unchanged::

    OUT_DIR/images/training/toy_000000.jpg       RGB, H x W
    OUT_DIR/annotations/training/toy_000000.png  uint8 labels, H x W
    OUT_DIR/images/validation/...                (same for the validation split)
    OUT_DIR/annotations/validation/...

Labels follow ADE20K's convention for ``reduce_zero_label=True``: 0 is "other" (ignored in
training and evaluation) and ``k`` in 1..150 is ADE20K class ``k - 1``. Each image is an outdoor
scene — sky above a random horizon, grass or road below — with trees, cars and people drawn
over it and a patch of unlabelled clutter (label 0). Every class has its own colour and
texture, so a model can tell them apart from local appearance.
"""
import os.path as osp
from pathlib import Path

import numpy as np
from PIL import Image

# ADE20K label (1-based, as stored in the PNGs) -> (name, base RGB colour, texture).
CLASSES = {
    3: ('sky', (110, 160, 230), 'smooth'),
    5: ('tree', (40, 120, 40), 'speckle'),
    7: ('road', (90, 90, 95), 'speckle'),
    10: ('grass', (90, 170, 60), 'vertical'),
    13: ('person', (200, 120, 90), 'smooth'),
    21: ('car', (190, 30, 30), 'horizontal'),
}
IGNORE_LABEL = 0
_CLUTTER = ((160, 140, 200), 'checker')

# (height, width) of the images, cycled through: non-square and of different sizes so that
# resizing, padding and batching of unequal shapes are exercised.
_SIZES = ((64, 96), (80, 64), (72, 72))
_SPLITS = (('training', 8), ('validation', 3))


def make_toy_ade20k(out_dir, seed=0):
    """Write the toy dataset under ``out_dir`` (created if missing) and return a summary line.

    The same ``seed`` writes the same pictures and labels. Existing files of the same names are
    overwritten; others are left alone.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    counts = []
    for split, num_images in _SPLITS:
        img_dir = out_dir / 'images' / split
        ann_dir = out_dir / 'annotations' / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for index in range(num_images):
            height, width = _SIZES[index % len(_SIZES)]
            image, label = _draw_scene(rng, height, width)
            name = f'toy_{index:06d}'
            Image.fromarray(image).save(img_dir / f'{name}.jpg', quality=95)
            Image.fromarray(label).save(ann_dir / f'{name}.png')
        counts.append(f'{num_images} {split}')
    names = ', '.join(f'{name} ({label})' for label, (name, _, _) in CLASSES.items())
    return (f'toy ADE20K written to {osp.abspath(out_dir)}: {" + ".join(counts)} images; '
            f'labels {names}, 0 = ignored')


def _draw_scene(rng, height, width):
    """Return ``(image, label)``: uint8 arrays of shapes ``(H, W, 3)`` and ``(H, W)``."""
    label = np.empty((height, width), np.uint8)
    rows, cols = np.mgrid[:height, :width]
    horizon = int(rng.integers(height // 3, height // 2))
    label[:horizon] = 3
    label[horizon:] = 7 if rng.random() < 0.5 else 10

    for _ in range(int(rng.integers(1, 3))):  # tree crowns: ellipses sitting on the horizon
        cy, cx = horizon - rng.integers(2, 8), rng.integers(0, width)
        ry, rx = rng.integers(6, 12), rng.integers(5, 10)
        label[((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1] = 5
    for _ in range(int(rng.integers(1, 3))):  # cars: boxes on the ground
        top = int(rng.integers(horizon + 2, height - 8))
        left = int(rng.integers(0, width - 16))
        label[top:top + int(rng.integers(6, 10)), left:left + int(rng.integers(12, 20))] = 21
    top, left = int(rng.integers(horizon - 6, height - 20)), int(rng.integers(0, width - 6))
    label[top:top + 18, left:left + 5] = 13  # a person: body and head
    label[(rows - (top - 3)) ** 2 + (cols - (left + 2)) ** 2 <= 9] = 13
    top, left = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
    label[top:top + 8, left:left + 8] = IGNORE_LABEL

    image = np.empty((height, width, 3), np.float32)
    for value, (_, colour, texture) in CLASSES.items():
        mask = label == value
        image[mask] = _texture(colour, texture, rows, cols)[mask]
    mask = label == IGNORE_LABEL
    image[mask] = _texture(*_CLUTTER, rows, cols)[mask]
    image += rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def _texture(colour, kind, rows, cols):
    """A ``(H, W, 3)`` float picture of ``colour`` modulated by a pattern of ``kind``."""
    pattern = {
        'smooth': np.zeros(rows.shape),
        'speckle': np.sin(rows * 1.7) * np.sin(cols * 2.3),
        'vertical': np.sin(cols * 1.5),
        'horizontal': np.sin(rows * 1.5),
        'checker': ((rows // 3 + cols // 3) % 2) * 2.0 - 1.0,
    }[kind]
    return np.asarray(colour, np.float32) * (1 + 0.25 * pattern[..., None])
