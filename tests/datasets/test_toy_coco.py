import hashlib
import json
import os.path as osp

import numpy as np
from PIL import Image, ImageDraw

from mmgroupmamba.datasets.toy_coco import CLASSES, make_toy_coco


def _make(tmp_path, name, seed=0):
    out = str(tmp_path / name)
    make_toy_coco(out, seed=seed, image_size=64, num_train=6, num_val=3)
    return out


def _digest(root):
    h = hashlib.sha256()
    for split in ('train', 'val'):
        with open(osp.join(root, 'annotations', f'{split}.json'), 'rb') as f:
            h.update(f.read())
        for image in json.load(open(osp.join(root, 'annotations', f'{split}.json')))['images']:
            with open(osp.join(root, split, image['file_name']), 'rb') as f:
                h.update(f.read())
    return h.hexdigest()


def test_valid_coco_json_with_masks_inside_boxes(tmp_path):
    root = _make(tmp_path, 'toy')
    for split, num_images in (('train', 6), ('val', 3)):
        coco = json.load(open(osp.join(root, 'annotations', f'{split}.json')))
        assert [c['name'] for c in coco['categories']] == list(CLASSES)
        assert len(coco['images']) == num_images
        images = {im['id']: im for im in coco['images']}
        assert len({a['id'] for a in coco['annotations']}) == len(coco['annotations'])
        assert {a['image_id'] for a in coco['annotations']} == set(images)  # >= 1 object each
        for ann in coco['annotations']:
            image = images[ann['image_id']]
            assert 1 <= ann['category_id'] <= len(CLASSES) and ann['iscrowd'] == 0
            x, y, w, h = ann['bbox']
            assert 0 <= x and 0 <= y and x + w <= image['width'] and y + h <= image['height']
            polygon = np.array(ann['segmentation'][0]).reshape(-1, 2)
            assert len(polygon) >= 3
            # Rasterise the mask: every mask pixel lies in the box, and the mask's area agrees
            # with the annotated area.
            mask = Image.new('L', (image['width'], image['height']))
            ImageDraw.Draw(mask).polygon([tuple(p) for p in polygon], fill=1)
            ys, xs = np.nonzero(np.array(mask))
            assert xs.min() >= np.floor(x) and xs.max() <= np.ceil(x + w)
            assert ys.min() >= np.floor(y) and ys.max() <= np.ceil(y + h)
            assert abs(len(xs) - ann['area']) <= 0.25 * ann['area'] + 10
            assert ann['area'] <= w * h
        pixels = np.array(Image.open(osp.join(root, split, coco['images'][0]['file_name'])))
        assert pixels.shape == (64, 64, 3)


def test_deterministic_with_seed(tmp_path):
    assert _digest(_make(tmp_path, 'a', seed=3)) == _digest(_make(tmp_path, 'b', seed=3))
    assert _digest(_make(tmp_path, 'a', seed=3)) != _digest(_make(tmp_path, 'c', seed=4))
