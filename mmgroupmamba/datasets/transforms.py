"""Classification transforms: timm's ImageNet augmentation wrapped as mmengine dataset transforms.

A pipeline reads ``dict(img_path, gt_label)`` and ends in ``dict(inputs, data_samples)``::

    LoadPILImage   -> results['img']: PIL RGB image
    TimmTransform  -> results['img']: float tensor (3, S, S), normalised with ImageNet mean/std
    PackClsInputs  -> dict(inputs=(3, S, S) tensor, data_samples=int label)

The normalised tensor leaves the transform (not uint8 pixels) because timm's random erasing
draws its noise in normalised space; ``default_collate`` then stacks a batch to (B, 3, S, S) and
(B,) labels.
"""
from typing import Sequence, Union

from PIL import Image
from timm.data import auto_augment, create_transform

from ..registry import TRANSFORMS


@TRANSFORMS.register_module()
class LoadPILImage:
    """Opens ``results['img_path']`` as an RGB PIL image into ``results['img']``."""

    def __call__(self, results: dict) -> dict:
        with open(results['img_path'], 'rb') as f:
            results['img'] = Image.open(f).convert('RGB')
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


@TRANSFORMS.register_module()
class TimmTransform:
    """timm's ImageNet transform (``timm.data.create_transform``) on ``results['img']``.

    Training (``is_training=True``): random resized crop, flip, RandAugment/colour jitter,
    normalisation and random erasing, as timm builds them from these arguments. Evaluation:
    resize the short side to ``input_size / crop_pct``, centre crop ``input_size``, normalise.

    Args:
        input_size (int | Sequence[int]): output size S (or (H, W)).
        is_training (bool): random training augmentation or deterministic evaluation transform.
        **kwargs: the other arguments of ``timm.data.create_transform``, e.g.
            ``auto_augment='rand-m9-mstd0.5-inc1'``, ``color_jitter=0.4``, ``re_prob=0.25``,
            ``interpolation='bicubic'``, ``crop_pct=0.875``.
    """

    def __init__(self, input_size: Union[int, Sequence[int]] = 224, is_training: bool = False,
                 **kwargs):
        if not isinstance(input_size, int):
            input_size = tuple(input_size)
        self.transform = create_transform(input_size=input_size, is_training=is_training,
                                          **kwargs)
        _allow_zero_bit_posterize(self.transform)

    def __call__(self, results: dict) -> dict:
        results['img'] = self.transform(results['img'])
        return results

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.transform})'


@TRANSFORMS.register_module()
class PackClsInputs:
    """Packs ``results`` into ``dict(inputs=image tensor, data_samples=class index)``."""

    def __call__(self, results: dict) -> dict:
        return dict(inputs=results['img'], data_samples=results['gt_label'])

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with 0 bits kept giving a black image as Pillow < 13 did."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(transform) -> None:
    """RandAugment's increasing posterize ('inc1') keeps 4 - int(0.4 * magnitude) bits, which
    is 0 at magnitude 10 (reached by m9 with mstd0.5); Pillow >= 13 refuses 0 bits, so those
    ops get ``_posterize``."""
    for t in getattr(transform, 'transforms', ()):
        for op in getattr(t, 'ops', ()):
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = _posterize
