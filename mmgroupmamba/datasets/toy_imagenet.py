"""A small synthetic dataset in the ImageNet folder layout.

Written for end-to-end tests of the classification configs; ``ImageNetFolder`` reads it
unchanged::

    OUT_DIR/train/<class>/<class>_000.JPEG    RGB, H x W (40..64 px, not square)
    OUT_DIR/val/<class>/<class>_000.JPEG

Each class is a coloured shape (its own colour and form) on a noisy background of random
colour, so a small network can learn the classes in a few iterations yet needs the shape and
colour, not the mean intensity, to tell them apart.
"""
from pathlib import Path

import numpy as np
from PIL import Image

# Folder name (an ImageNet-style synset id) -> (shape, RGB colour). Eight classes so that top-5
# accuracy is meaningful.
CLASSES = {
    'n00000000': ('disc', (220, 40, 40)),
    'n00000001': ('disc', (40, 180, 60)),
    'n00000002': ('square', (40, 80, 220)),
    'n00000003': ('square', (230, 200, 40)),
    'n00000004': ('cross', (200, 60, 200)),
    'n00000005': ('cross', (40, 200, 200)),
    'n00000006': ('stripes', (240, 240, 240)),
    'n00000007': ('stripes', (20, 20, 20)),
}
_SPLITS = (('train', 12), ('val', 4))


def make_toy_imagenet(out_dir, seed=0):
    """Write the toy dataset under ``out_dir`` (created if missing) and return a summary line.

    The same ``seed`` writes the same pictures. Existing files of the same names are
    overwritten; others are left alone.
    """
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    counts = []
    for split, per_class in _SPLITS:
        for name, (shape, colour) in CLASSES.items():
            class_dir = out_dir / split / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                height, width = rng.integers(40, 65, size=2)
                image = _draw(rng, int(height), int(width), shape, colour)
                Image.fromarray(image).save(class_dir / f'{name}_{index:03d}.JPEG', quality=95)
        counts.append(f'{split}: {per_class * len(CLASSES)} images')
    return (f'toy ImageNet with {len(CLASSES)} classes written to {out_dir} '
            f'({", ".join(counts)})')


def _draw(rng, height, width, shape, colour):
    """One (height, width, 3) uint8 picture of ``shape`` in ``colour`` on a noisy background."""
    background = rng.integers(60, 180, size=3)
    image = background + rng.normal(0, 20, size=(height, width, 3))
    ys, xs = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    radius = rng.uniform(0.25, 0.35) * min(height, width)
    if shape == 'disc':
        mask = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius ** 2
    elif shape == 'square':
        mask = (abs(ys - cy) <= radius) & (abs(xs - cx) <= radius)
    elif shape == 'cross':
        arm = radius / 3
        mask = (((abs(ys - cy) <= arm) & (abs(xs - cx) <= radius))
                | ((abs(xs - cx) <= arm) & (abs(ys - cy) <= radius)))
    else:  # stripes over the whole picture
        mask = (xs // 4) % 2 == 0
    image[mask] = np.asarray(colour) + rng.normal(0, 10, size=(int(mask.sum()), 3))
    return np.clip(image, 0, 255).astype(np.uint8)
