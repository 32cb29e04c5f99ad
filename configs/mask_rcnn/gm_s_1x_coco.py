# Mask R-CNN with a GroupMamba-S backbone on COCO, 1x schedule (see gm_t_1x_coco.py).
_base_ = ['./gm_t_1x_coco.py']

# `python tools/convert_official.py groupmamba_small.pth checkpoints/groupmamba_small_backbone.pth`
pretrained = 'checkpoints/groupmamba_small_backbone.pth'

model = dict(
    backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[64, 128, 348, 512]))
