import hashlib
import os
import os.path as osp

import numpy as np
import pytest
from PIL import Image

from mmgroupmamba.datasets.toy_ade20k import CLASSES, IGNORE_LABEL, make_toy_ade20k

SPLITS = {'training': 8, 'validation': 3}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('toy_ade20k'))
    summary = make_toy_ade20k(out, seed=0)
    assert out in summary and '8 training' in summary and '3 validation' in summary
    return out


def _pairs(root, split):
    """(image array, label array) of every sample of ``split``, in file-name order."""
    names = sorted(os.listdir(osp.join(root, 'images', split)))
    labels = sorted(os.listdir(osp.join(root, 'annotations', split)))
    assert [osp.splitext(n)[0] for n in names] == [osp.splitext(n)[0] for n in labels]
    return [(np.array(Image.open(osp.join(root, 'images', split, n))),
             np.array(Image.open(osp.join(root, 'annotations', split, a))))
            for n, a in zip(names, labels)]


def _digest(root):
    h = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(osp.join(folder, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_ade20k_layout_and_label_convention(root):
    for split, num_images in SPLITS.items():
        pairs = _pairs(root, split)
        assert len(pairs) == num_images
        assert all(n.endswith('.jpg') for n in os.listdir(osp.join(root, 'images', split)))
        shapes = set()
        seen = set()
        for image, label in pairs:
            assert image.dtype == np.uint8 and image.shape == label.shape + (3,)
            assert label.dtype == np.uint8
            values = set(np.unique(label).tolist())
            assert values <= set(CLASSES) | {IGNORE_LABEL}
            assert IGNORE_LABEL in values  # every picture has unlabelled clutter
            shapes.add(label.shape)
            seen |= values
        assert seen == set(CLASSES) | {IGNORE_LABEL}
        assert len(shapes) > 1 and any(h != w for h, w in shapes)


def test_pixels_are_drawn_from_their_labels(root):
    # The mean colour of each labelled region is nearest to its own class colour: the picture
    # and the label map describe the same scene.
    colours = {k: np.array(c, np.float64) for k, (_, c, _) in CLASSES.items()}
    for image, label in _pairs(root, 'training'):
        for value in set(np.unique(label).tolist()) - {IGNORE_LABEL}:
            mean = image[label == value].mean(axis=0)
            nearest = min(colours, key=lambda k: np.abs(colours[k] - mean).sum())
            assert nearest == value, (CLASSES[value][0], mean)


def test_same_seed_same_files(root, tmp_path):
    again = str(tmp_path / 'again')
    make_toy_ade20k(again, seed=0)
    assert _digest(again) == _digest(root)
    other = str(tmp_path / 'other')
    make_toy_ade20k(other, seed=1)
    assert _digest(other) != _digest(root)


def test_mmseg_reads_it_with_ade20k_class_names(root):
    from mmcv.transforms import LoadImageFromFile
    from mmseg.datasets import ADE20KDataset
    from mmseg.datasets.transforms import LoadAnnotations

    dataset = ADE20KDataset(
        data_root=root,
        data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
        pipeline=[LoadImageFromFile(), LoadAnnotations(reduce_zero_label=True)])
    assert len(dataset) == SPLITS['validation']
    names = dataset.metainfo['classes']
    assert len(names) == 150
    for value, (name, _, _) in CLASSES.items():
        assert names[value - 1] == name
    for index in range(len(dataset)):
        sample = dataset[index]
        raw = np.array(Image.open(sample['seg_map_path']))
        # reduce_zero_label: label k becomes class k - 1 and 0 becomes the ignore index 255.
        expected = np.where(raw == IGNORE_LABEL, 255, raw.astype(np.int64) - 1)
        np.testing.assert_array_equal(sample['gt_seg_map'], expected)
        assert sample['img'].shape[:2] == raw.shape
