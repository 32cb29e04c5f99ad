import hashlib
import json
import os.path as osp

import numpy as np
import pytest
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


def test_aspect_ratios_give_images_of_those_shapes_with_shapes_inside(tmp_path):
    """COCO-like sizes: the longer side is image_size, the height / width one of the ratios; the
    JSON's sizes are the files', and every shape lies inside its image."""
    out = str(tmp_path / 'coco_like')
    make_toy_coco(out, image_size=80, num_train=12, num_val=2, max_objects=6,
                  aspect_ratios=(0.75, 1.5))
    coco = json.load(open(osp.join(out, 'annotations', 'train.json')))
    shapes = set()
    for image in coco['images']:
        width, height = Image.open(osp.join(out, 'train', image['file_name'])).size
        assert (width, height) == (image['width'], image['height'])
        shapes.add((width, height))
    assert shapes == {(80, 60), (53, 80)}
    images = {im['id']: im for im in coco['images']}
    for ann in coco['annotations']:
        image = images[ann['image_id']]
        x, y, w, h = ann['bbox']
        assert 0 <= x and 0 <= y and x + w <= image['width'] and y + h <= image['height']


def test_bad_aspect_ratios_are_refused(tmp_path):
    for ratios in [(), (0.,), (1., -2.)]:
        with pytest.raises(ValueError, match='aspect_ratios'):
            make_toy_coco(str(tmp_path / 'bad'), aspect_ratios=ratios)


def test_make_toy_data_passes_the_coco_options_and_refuses_them_elsewhere(tmp_path):
    import subprocess
    import sys
    tool = osp.join(osp.dirname(__file__), '..', '..', 'tools', 'make_toy_data.py')
    out = str(tmp_path / 'cli')
    subprocess.run([sys.executable, tool, 'coco', out, '--image-size', '48', '--num-train', '2',
                    '--num-val', '1', '--aspect-ratios', '0.5'], check=True, capture_output=True)
    coco = json.load(open(osp.join(out, 'annotations', 'train.json')))
    assert [(im['width'], im['height']) for im in coco['images']] == [(48, 24)] * 2
    refused = subprocess.run([sys.executable, tool, 'ade20k', str(tmp_path / 'ade'),
                              '--num-train', '2'], capture_output=True, text=True)
    assert refused.returncode == 2
    assert 'ade20k dataset takes none of the coco options (--num-train)' in refused.stderr
    assert not osp.exists(tmp_path / 'ade')
