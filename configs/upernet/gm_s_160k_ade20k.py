# UperNet with a GroupMamba-S backbone on ADE20K; recipe as in gm_t_160k_ade20k.py.
_base_ = ['./gm_t_160k_ade20k.py']

pretrained = 'checkpoints/groupmamba_small_backbone.pth'

model = dict(
    backbone=dict(
        arch='small',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[64, 128, 348, 512]),
    auxiliary_head=dict(in_channels=348))
