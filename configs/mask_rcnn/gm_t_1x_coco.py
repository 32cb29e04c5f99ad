# Mask R-CNN with a GroupMamba-T backbone on COCO, 1x schedule: the recipe of Swin's Mask R-CNN 1x
# (AdamW lr 1e-4, weight decay 0.05, 1000-iteration linear warm-up, 12 epochs with the LR divided
# by 10 after epochs 8 and 11, 1333x800 inputs, 16 images per step as 8 GPUs x 2).
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmgroupmamba'], allow_failed_imports=False)

# Atomic checkpoints, auto-resume from the newest checkpoint that loads, and exact resume (random
# states in every checkpoint), for tools/train.py and mmdet's/mmseg's own tools alike.
runner_type = 'DurableRunner'
# Stop at the first non-finite loss, naming the iteration (patience: how many in a row to allow).
custom_hooks = [dict(type='NonFiniteLossHook', patience=0)]

# The ImageNet-pretrained GroupMamba-T ('backbone.'-prefixed keys), either the official release
# converted by
#   python tools/convert_official.py groupmamba_tiny.pth checkpoints/groupmamba_tiny_backbone.pth
# or our own ImageNet training (configs/imagenet/) extracted by
#   python tools/cls2backbone.py CLS_CHECKPOINT checkpoints/groupmamba_tiny_backbone.pth
# When the file is absent, training stops at weight initialisation with
# "FileNotFoundError: checkpoint checkpoints/groupmamba_tiny_backbone.pth can not be found."
pretrained = 'checkpoints/groupmamba_tiny_backbone.pth'

model = dict(
    backbone=dict(
        _delete_=True,
        type='GroupMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.2,
        # One compiled graph (CUDA) for every image size from the first iteration: detection
        # resizes and pads each batch to a new size. The first iterations compile (minutes).
        torch_compile=dict(dynamic=True),
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    neck=dict(in_channels=[64, 128, 348, 448]))

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=1000),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11],
         gamma=0.1),
]

# No weight decay on normalisation layers (as Swin's recipe; the scan's per-group output norm
# keeps its affine parameters as raw tensors named out_norm_*), nor on the scan's A_log / D and
# the layer's skip_scale (as the official GroupMamba training). The parameters that share
# settings step as one group (MergedGroupsOptimWrapperConstructor): the same update as mmengine's
# default constructor, without its host time of one group per parameter.
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            '.out_norm_': dict(decay_mult=0.),
            '.A_log': dict(decay_mult=0.),
            '.D': dict(decay_mult=0.),
            '.skip_scale': dict(decay_mult=0.),
        }))

auto_scale_lr = dict(enable=False, base_batch_size=16)
