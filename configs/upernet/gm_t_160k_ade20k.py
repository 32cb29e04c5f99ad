# UperNet with a GroupMamba-T backbone on ADE20K: 512x512 crops, 160k iterations, batch 16
# (8 GPUs x 2). The recipe is mmseg's Swin UperNet recipe, which the GroupMamba paper follows:
# AdamW (lr 6e-5, betas (0.9, 0.999), weight decay 0.01), linear warm-up over 1500 iterations
# then poly decay (power 1) to 0, SyncBN in the heads, auxiliary FCN head on stage 3 (loss 0.4).
_base_ = ['mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py']

# The ImageNet-pretrained GroupMamba-T weights, keys under 'backbone.'.
pretrained = 'checkpoints/groupmamba_tiny_backbone.pth'

custom_imports = dict(imports=['mmgroupmamba'], allow_failed_imports=False)

# Atomic checkpoints, auto-resume from the newest checkpoint that loads, and exact resume (random
# states in every checkpoint), for tools/train.py and mmdet's/mmseg's own tools alike.
runner_type = 'DurableRunner'
# Stop at the first non-finite loss, naming the iteration (patience: how many in a row to allow).
custom_hooks = [dict(type='NonFiniteLossHook', patience=0)]

model = dict(
    backbone=dict(
        _delete_=True,
        type='GroupMamba',
        arch='tiny',
        out_indices=(0, 1, 2, 3),
        # Swin's UperNet configs use 0.3 for T, S and B alike.
        drop_path_rate=0.3,
        # On CUDA the backbone runs as one compiled graph replayed as CUDA graphs on the fixed
        # 512x512 crops (evaluation's changing sizes run compiled without graphs): a batch-2
        # iteration is host-bound otherwise. The first iterations (and the first evaluation)
        # compile for a few minutes. False runs it eagerly; CPU runs are always eager.
        torch_compile='reduce-overhead',
        init_cfg=dict(type='Pretrained', checkpoint=pretrained, prefix='backbone.')),
    decode_head=dict(in_channels=[64, 128, 348, 448], channels=512, num_classes=150),
    auxiliary_head=dict(in_channels=348, in_index=2, channels=256, num_classes=150))

# Swin's optimizer, without weight decay on any norm: norm layers (the backbone's LayerNorms and
# stem BNs, the heads' SyncBNs) through norm_decay_mult, the SSM's grouped output norm (plain
# parameters) by name, and, as in GroupMamba's ImageNet training, the SSM's A_log and D and the
# layers' skip_scale. The parameters that share settings step as one group
# (MergedGroupsOptimWrapperConstructor): the same update as mmengine's default constructor, without
# its host time of one group per parameter.
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='MergedGroupsOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        custom_keys={
            'ssm.out_norm': dict(decay_mult=0.),
            'ssm.A_log': dict(decay_mult=0.),
            'ssm.D': dict(decay_mult=0.),
            'mixer.skip_scale': dict(decay_mult=0.),
        }))
