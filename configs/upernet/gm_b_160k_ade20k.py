# UperNet with a GroupMamba-B backbone on ADE20K; recipe as in gm_t_160k_ade20k.py.
_base_ = ['./gm_t_160k_ade20k.py']

pretrained = 'checkpoints/groupmamba_base_backbone.pth'

model = dict(
    backbone=dict(
        arch='base',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[96, 192, 424, 512]),
    auxiliary_head=dict(in_channels=424))
