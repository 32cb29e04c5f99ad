"""ImageNet in the standard folder layout, as an mmengine dataset.

    data_root/train/<class>/<image>     e.g. train/n01440764/n01440764_10026.JPEG
    data_root/val/<class>/<image>       the validation images sorted into class folders

Classes are the sorted sub-folder names of the split (torchvision's ``ImageFolder`` rule, which
is also how the official GroupMamba code reads ImageNet), so index ``k`` is the ``k``-th synset.
"""
import os
import os.path as osp
from typing import List

from mmengine.dataset import BaseDataset

from ..registry import DATASETS

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


@DATASETS.register_module()
class ImageNetFolder(BaseDataset):
    """Images under ``data_root/data_prefix['img_path']/<class>/``, one class per folder.

    Each sample is ``dict(img_path=str, gt_label=int)`` before the pipeline; ``metainfo['classes']``
    holds the folder names in label order.

    Args:
        data_root (str): the dataset folder, e.g. ``'data/imagenet/'``.
        data_prefix (dict): ``dict(img_path='train')`` or ``dict(img_path='val')``.
        pipeline (list[dict]): the transforms, e.g. ``LoadPILImage``, ``TimmTransform``,
            ``PackClsInputs``.
        **kwargs: the other arguments of :class:`mmengine.dataset.BaseDataset`.
    """

    def __init__(self, data_root: str, data_prefix: dict = dict(img_path='train'), **kwargs):
        super().__init__(data_root=data_root, data_prefix=data_prefix, **kwargs)

    def load_data_list(self) -> List[dict]:
        root = self.data_prefix['img_path']
        if not osp.isdir(root):
            raise FileNotFoundError(
                f'ImageNet split folder {root!r} does not exist: set data_root to the folder '
                f'holding train/ and val/ (one sub-folder per class).')
        classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        data_list = []
        for label, name in enumerate(classes):
            class_dir = osp.join(root, name)
            for file_name in sorted(os.listdir(class_dir)):
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    data_list.append(dict(img_path=osp.join(class_dir, file_name), gt_label=label))
        if not data_list:
            raise FileNotFoundError(f'No images found in the class folders of {root!r}.')
        self._metainfo['classes'] = tuple(classes)
        return data_list
