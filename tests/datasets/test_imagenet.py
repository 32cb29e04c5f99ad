"""Toy ImageNet, the folder dataset and the timm-based transforms."""
import hashlib

import numpy as np
import pytest
import torch
from mmengine.registry import DefaultScope
from PIL import Image

from mmgroupmamba.datasets import ImageNetFolder, LoadPILImage, PackClsInputs, TimmTransform
from mmgroupmamba.datasets.toy_imagenet import CLASSES, make_toy_imagenet
from mmgroupmamba.datasets.transforms import _posterize


@pytest.fixture(scope='module')
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('toy_imagenet')
    make_toy_imagenet(root, seed=0)
    return root


def _digest(root):
    files = sorted(p for p in root.rglob('*.JPEG'))
    return hashlib.sha256(b''.join(p.read_bytes() for p in files)).hexdigest(), len(files)


def test_toy_imagenet_layout_and_determinism(toy_root, tmp_path):
    summary = make_toy_imagenet(tmp_path, seed=0)
    assert '8 classes' in summary and 'train: 96 images' in summary and 'val: 32' in summary
    assert _digest(tmp_path) == _digest(toy_root)
    assert sorted(p.name for p in (toy_root / 'val').iterdir()) == sorted(CLASSES)
    image = Image.open(next((toy_root / 'train' / 'n00000003').iterdir()))
    assert image.mode == 'RGB' and 40 <= min(image.size) and max(image.size) <= 64


def test_folder_dataset_labels_follow_sorted_class_folders(toy_root):
    dataset = ImageNetFolder(data_root=str(toy_root), data_prefix=dict(img_path='val'))
    assert len(dataset) == 32
    assert dataset.metainfo['classes'] == tuple(sorted(CLASSES))
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        assert f"/{dataset.metainfo['classes'][info['gt_label']]}/" in info['img_path']
    with pytest.raises(FileNotFoundError, match='data_root'):
        ImageNetFolder(data_root=str(toy_root), data_prefix=dict(img_path='test'))


def test_pipeline_packs_normalised_images(toy_root):
    pipeline = [dict(type='LoadPILImage'),
                dict(type='TimmTransform', is_training=False, input_size=24, crop_pct=0.875,
                     interpolation='bicubic'),
                dict(type='PackClsInputs')]
    with DefaultScope.overwrite_default_scope('mmgroupmamba'):  # as the configs set it
        dataset = ImageNetFolder(data_root=str(toy_root), data_prefix=dict(img_path='train'),
                                 pipeline=pipeline)
    sample = dataset[5]
    assert set(sample) == {'inputs', 'data_samples'}
    assert sample['inputs'].shape == (3, 24, 24) and sample['inputs'].dtype == torch.float32
    assert sample['data_samples'] == dataset.get_data_info(5)['gt_label']
    assert sample['inputs'].min() < 0  # normalised with ImageNet mean / std


def test_eval_transform_resizes_by_crop_pct_then_centre_crops():
    # A 64 x 128 picture whose columns encode x: resize short side to 32 / 0.5 = 64 (no-op),
    # centre crop 32 x 32 keeps columns 48..79.
    columns = np.tile(np.arange(128, dtype=np.uint8) * 2, (64, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    transform = TimmTransform(input_size=32, is_training=False, crop_pct=0.5,
                              interpolation='bicubic', mean=(0., 0., 0.), std=(1., 1., 1.))
    out = transform(dict(img=image))['img']
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[0, 0], torch.arange(48, 80) * 2 / 255.)


def test_training_transform_survives_zero_bit_posterize(toy_root):
    transform = TimmTransform(input_size=32, is_training=True, interpolation='bicubic',
                              auto_augment='rand-m10-mstd0.5-inc1', re_prob=0.25,
                              re_mode='pixel')
    results = LoadPILImage()(dict(img_path=str(next((toy_root / 'train').rglob('*.JPEG')))))
    for _ in range(20):
        out = transform(dict(img=results['img']))['img']
        assert out.shape == (3, 32, 32)
    image = Image.new('RGB', (4, 4), (200, 100, 50))
    assert np.asarray(_posterize(image, 0)).max() == 0  # Pillow < 13's 0-bit result
    assert np.asarray(_posterize(image, 1)).tolist()[0][0] == [128, 0, 0]
    assert PackClsInputs()(dict(img=out, gt_label=3))['data_samples'] == 3
