# Mask R-CNN with a GroupMamba-B backbone on COCO, 1x schedule (see gm_t_1x_coco.py).
_base_ = ['./gm_t_1x_coco.py']

# `python tools/convert_official.py groupmamba_base.pth checkpoints/groupmamba_base_backbone.pth`
pretrained = 'checkpoints/groupmamba_base_backbone.pth'

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.3, init_cfg=dict(checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 424, 512]))
