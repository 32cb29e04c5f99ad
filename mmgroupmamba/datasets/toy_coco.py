"""A small synthetic COCO-format instance-segmentation dataset, made on the fly.

Each image (square, or of random aspect ratios up to ``image_size`` on its longer side) shows 1
to ``max_objects`` filled shapes (circle, square, triangle), each class in its own colour family,
on a noisy two-colour gradient background. Every shape is drawn as the very polygon stored in its
annotation, so the masks are exact; shapes never overlap, so no mask is occluded. Layout written under ``out_dir``::

    train/000000.png ...            val/000000.png ...
    annotations/train.json          annotations/val.json     (COCO instances format)

The same ``seed`` always writes the same files.
"""
import json
import math
import os
import os.path as osp
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ('circle', 'square', 'triangle')
# Base RGB colour of each class; each instance is jittered around it.
_CLASS_COLOURS = ((220, 40, 40), (40, 190, 60), (50, 80, 230))
_CIRCLE_VERTICES = 32


def make_toy_coco(out_dir: str,
                  seed: int = 0,
                  *,
                  image_size: int = 96,
                  num_train: int = 300,
                  num_val: int = 50,
                  max_objects: int = 3,
                  aspect_ratios: Sequence[float] = (1.,)) -> str:
    """Write the toy dataset to ``out_dir`` and return a one-line summary.

    Args:
        out_dir: folder to write into (created if needed; existing files are overwritten).
        seed: seed of the generator; train and val use independent streams derived from it.
        image_size: the longer side of the images, in pixels.
        num_train, num_val: number of images of each split.
        max_objects: most shapes per image.
        aspect_ratios: height / width of the images, one drawn per image (COCO's photos are
            mostly 640 px on the longer side at 4:3 or 3:2, landscape or portrait); the default
            makes square images.
    """
    if not aspect_ratios or any(not r > 0 for r in aspect_ratios):
        raise ValueError(f'aspect_ratios must be positive numbers, got {aspect_ratios!r}')
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    counts = {}
    for split_index, (split, num_images) in enumerate((('train', num_train), ('val', num_val))):
        rng = np.random.default_rng([seed, split_index])
        coco = _make_split(rng, out_dir, split, num_images, image_size, max_objects,
                           tuple(aspect_ratios))
        # The JSON goes last: a split is usable only once all its images exist.
        with open(osp.join(out_dir, 'annotations', f'{split}.json'), 'w') as f:
            json.dump(coco, f)
        counts[split] = (len(coco['images']), len(coco['annotations']))
    sizes = (f'{image_size}x{image_size} px' if tuple(aspect_ratios) == (1.,)
             else f'{image_size} px on the longer side, height/width in {tuple(aspect_ratios)}')
    return (f'toy COCO in {out_dir}: classes {", ".join(CLASSES)}; {sizes}; '
            f'train {counts["train"][0]} images / {counts["train"][1]} objects, '
            f'val {counts["val"][0]} images / {counts["val"][1]} objects')


def _make_split(rng: np.random.Generator, out_dir: str, split: str, num_images: int,
                size: int, max_objects: int, aspect_ratios: Tuple[float, ...]) -> Dict:
    os.makedirs(osp.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        file_name = f'{image_id - 1:06d}.png'
        height, width = _image_shape(rng, size, aspect_ratios)
        canvas = Image.fromarray(_background(rng, height, width))
        draw = ImageDraw.Draw(canvas)
        for label, polygon in _place_shapes(rng, height, width, max_objects):
            colour = np.clip(np.array(_CLASS_COLOURS[label]) + rng.integers(-30, 31, 3), 0, 255)
            draw.polygon([tuple(p) for p in polygon], fill=tuple(int(c) for c in colour))
            x0, y0 = polygon.min(axis=0)
            x1, y1 = polygon.max(axis=0)
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=label + 1,
                segmentation=[[round(float(v), 2) for v in polygon.reshape(-1)]],
                area=_polygon_area(polygon),
                bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)], iscrowd=0))
        canvas.save(osp.join(out_dir, split, file_name))
        images.append(dict(id=image_id, file_name=file_name, width=width, height=height))
    categories = [dict(id=i + 1, name=name) for i, name in enumerate(CLASSES)]
    return dict(images=images, annotations=annotations, categories=categories)


def _image_shape(rng: np.random.Generator, size: int,
                 aspect_ratios: Tuple[float, ...]) -> Tuple[int, int]:
    """(height, width) of the next image: ``size`` on the longer side (square images draw
    nothing, so that the square datasets stay as they were)."""
    if aspect_ratios == (1.,):
        return size, size
    ratio = aspect_ratios[int(rng.integers(len(aspect_ratios)))]
    if ratio <= 1:
        return max(1, round(size * ratio)), size
    return size, max(1, round(size / ratio))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear gradient between two muted colours plus pixel noise: (height, width, 3) uint8."""
    start, end = rng.uniform(40, 200, (2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(float)
    ys, xs = ys / max(height - 1, 1), xs / max(width - 1, 1)
    t = (np.cos(angle) * xs + np.sin(angle) * ys)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = start + t[..., None] * (end - start) + rng.normal(0, 12, (height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def _place_shapes(rng: np.random.Generator, height: int, width: int,
                  max_objects: int) -> List[Tuple[int, np.ndarray]]:
    """Random non-overlapping shapes as (label, polygon (V, 2) in pixel x, y) pairs."""
    shapes, discs = [], []  # discs: (cx, cy, r) enclosing each placed shape
    extent = np.array([width, height], dtype=float)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            radius = rng.uniform(0.1, 0.22) * min(height, width)
            cx, cy = rng.uniform(radius + 1, extent - radius - 1)
            if all(math.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in discs):
                break
        else:
            continue
        label = int(rng.integers(len(CLASSES)))
        discs.append((cx, cy, radius))
        angle = rng.uniform(0, 2 * math.pi)
        shapes.append((label, _polygon(CLASSES[label], cx, cy, radius, angle)))
    return shapes


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices (V, 2) of a regular polygon inscribed in the disc (cx, cy, radius)."""
    num_vertices = {'circle': _CIRCLE_VERTICES, 'square': 4, 'triangle': 3}[kind]
    theta = angle + 2 * math.pi * np.arange(num_vertices) / num_vertices
    return np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)


def _polygon_area(polygon: np.ndarray) -> float:
    """Shoelace area of a simple polygon (V, 2)."""
    x, y = polygon[:, 0], polygon[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
