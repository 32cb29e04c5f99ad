# The quickstart: Mask R-CNN with a GroupMamba-T backbone trained from scratch on the CPU on the
# project's toy COCO (`python tools/make_toy_data.py coco data/toy_coco`: circles, squares and
# triangles on noisy backgrounds, 96x96 images). Everything not below is gm_t_1x_coco.py's; what
# changes shrinks the problem to CPU size: small images, a 128-channel FPN and lighter RoI heads,
# fewer sampled anchors/RoIs and proposals, a short schedule (300 iterations) with a higher LR.
_base_ = ['./gm_t_1x_coco.py']

data_root = 'data/toy_coco/'
metainfo = dict(
    classes=('circle', 'square', 'triangle'),
    palette=[(220, 40, 40), (40, 190, 60), (50, 80, 230)])
image_scale = (96, 96)
fpn_channels = 128

model = dict(
    # From scratch (no ImageNet checkpoint); eager: a short run is not worth compiling.
    backbone=dict(drop_path_rate=0., torch_compile=False, init_cfg=None),
    neck=dict(out_channels=fpn_channels),
    rpn_head=dict(in_channels=fpn_channels, feat_channels=fpn_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(in_channels=fpn_channels, fc_out_channels=256, num_classes=3),
        mask_roi_extractor=dict(out_channels=fpn_channels),
        mask_head=dict(in_channels=fpn_channels, conv_out_channels=fpn_channels, num_classes=3)),
    train_cfg=dict(
        rpn=dict(sampler=dict(num=64)),
        rpn_proposal=dict(nms_pre=500, max_per_img=200),
        rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100),
        rcnn=dict(max_per_img=20)))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/train.json',
        data_prefix=dict(img='train/'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    dataset=dict(
        data_root=data_root,
        metainfo=metainfo,
        ann_file='annotations/val.json',
        data_prefix=dict(img='val/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json', metric=['bbox', 'segm'])
test_evaluator = val_evaluator

max_epochs = 4
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[3], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(max_norm=10, norm_type=2))

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
randomness = dict(seed=0)
