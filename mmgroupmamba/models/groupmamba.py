"""GroupMamba (Shaker et al., arXiv 2407.13772): dense-prediction backbone and ImageNet classifier.

Top-down: ``GroupMamba`` = stem -> 4 stages (downsample -> blocks -> LayerNorm);
``GroupMambaBlock`` = x + DropPath(GroupMambaLayer(x)), x + DropPath(FFN(LN(x)));
``GroupMambaLayer`` = LayerNorm -> four channel groups, each a visual selective scan in its own
direction (``GroupedSS2D``) -> channel affinity modulation -> LayerNorm -> Linear.

Tokens travel channels-last, ``(B, H, W, C)``; convolutions see them as NCHW views with a
channels-last memory layout, so no copies are made between the two.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.model import BaseModule
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS

from ..ops import SCAN_DIRECTIONS
from ..ops.fused import (add_layer_norm, channel_affinity, compute_dtype, ffn, layer_norm,
                         linear, mixer_norm, modulate_norm)
from ..ops.mixer import grouped_ss2d
from .compiling import dense_conv, resolve_compile, run_compiled
from .weights import check_outputs_finite, check_weights_on_load

# Variants of the paper. Channels per stage, blocks per stage, width of the stem convolutions and
# FFN expansion per stage.
ARCH_SETTINGS: Dict[str, dict] = {
    'tiny': dict(embed_dims=(64, 128, 348, 448), depths=(3, 4, 9, 3), stem_channels=32,
                 mlp_ratios=(8, 8, 4, 4)),
    'small': dict(embed_dims=(64, 128, 348, 512), depths=(3, 4, 16, 3), stem_channels=64,
                  mlp_ratios=(8, 8, 4, 4)),
    'base': dict(embed_dims=(96, 192, 424, 512), depths=(3, 6, 21, 3), stem_channels=64,
                 mlp_ratios=(8, 8, 4, 4)),
}

# The official model builds its stage and block norms with eps 1e-6 but leaves the norms inside
# the stem, the downsampling layers, the GroupMamba layer and the SS2D output at PyTorch's 1e-5.
_NORM_EPS = 1e-6
_INNER_NORM_EPS = 1e-5


def resolve_arch(arch: Union[str, dict]) -> dict:
    """A variant name or dict -> ``dict(embed_dims, depths, stem_channels, mlp_ratios)``."""
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise KeyError(f'Unknown GroupMamba arch {arch!r}; choose one of '
                           f'{sorted(ARCH_SETTINGS)} or pass a dict.')
        return dict(ARCH_SETTINGS[arch])
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
    keys = {'embed_dims', 'depths', 'stem_channels', 'mlp_ratios'}
    if set(arch) != keys:
        raise KeyError(f'A custom arch needs exactly the keys {sorted(keys)}, got {sorted(arch)}')
    settings = {k: (tuple(v) if k != 'stem_channels' else v) for k, v in arch.items()}
    for key in ('embed_dims', 'depths', 'mlp_ratios'):
        if len(settings[key]) != 4:
            raise ValueError(f'arch[{key!r}] needs one entry per stage (4), got {settings[key]}')
    for dims in settings['embed_dims']:
        if dims % 4:
            raise ValueError(f'embed_dims must be divisible by the 4 scan groups, got {dims}')
    return settings


def _init_weights(module: nn.Module) -> None:
    """Initialisation of the official model for the standard layers (the SSM parameters are
    initialised where they are created, see ``GroupedSS2D.reset_parameters``)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0., math.sqrt(2. / (fan_out // module.groups)))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _norm(norm: nn.LayerNorm, x: torch.Tensor,
          out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``norm`` applied to (B, H, W, C) tokens by the fused kernel (PyTorch's is slow for short
    rows of channels), its output in ``out_dtype`` (None: as ``norm(x)``)."""
    return layer_norm(x, norm.weight, norm.bias, norm.eps, out_dtype)


class GroupedSS2D(nn.Module):
    """Four visual selective-scan (SS2D) mixers side by side, one per quarter of the channels,
    group ``g`` scanning the image in direction ``SCAN_DIRECTIONS[g]``.

    Per group (``d = C / 4`` channels, one state per channel (``N = 1``), ``R = ceil(d / 16)``)::

        u, z = in_proj(x)                      # d each
        u = SiLU(depthwise 3x3 conv(u))
        dt, B, C = x_proj(u)                   # R, N, N
        y = selective_scan(u, dt_proj(dt), A=-exp(A_log), B, C, D, dt_bias, softplus)
        out = out_proj(LayerNorm(y) * SiLU(z))

    The groups' parameters are stacked on a leading group axis so that all four run as batched
    matmuls, one depthwise convolution and one scan call.

    Args:
        embed_dims (int): C, the channels of all groups together.
    """

    groups = len(SCAN_DIRECTIONS)
    d_state = 1

    def __init__(self, embed_dims: int):
        super().__init__()
        self.embed_dims = embed_dims
        self.group_dims = d = embed_dims // self.groups
        self.dt_rank = math.ceil(d / 16)
        G, N, R = self.groups, self.d_state, self.dt_rank
        self.in_proj_weight = nn.Parameter(torch.empty(G, 2 * d, d))
        self.conv = nn.Conv2d(embed_dims, embed_dims, 3, padding=1, groups=embed_dims)
        self.x_proj_weight = nn.Parameter(torch.empty(G, R + 2 * N, d))
        self.dt_proj_weight = nn.Parameter(torch.empty(G, d, R))
        self.dt_bias = nn.Parameter(torch.empty(G * d))
        self.A_log = nn.Parameter(torch.empty(G * d, N))
        self.D = nn.Parameter(torch.empty(G * d))
        self.out_norm_weight = nn.Parameter(torch.empty(G, d))
        self.out_norm_bias = nn.Parameter(torch.empty(G, d))
        self.out_proj_weight = nn.Parameter(torch.empty(G, d, d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official initialisation: in/out projections as Linear layers (trunc normal, std
        .02), x_proj as PyTorch's default Linear, dt weights uniform in +-R^-1/2, dt bias the
        inverse softplus of a log-uniform step in [1e-3, 0.1] (at least 1e-4), S4D-real A,
        D = 1."""
        d = self.group_dims
        dt_min, dt_max, dt_floor = 1e-3, .1, 1e-4
        nn.init.trunc_normal_(self.in_proj_weight, std=.02)
        nn.init.trunc_normal_(self.out_proj_weight, std=.02)
        bound = 1 / math.sqrt(d)
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        bound = self.dt_rank ** -.5
        nn.init.uniform_(self.dt_proj_weight, -bound, bound)
        log_dt = torch.rand_like(self.dt_bias) * (math.log(dt_max) - math.log(dt_min))
        dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.arange(1, self.d_state + 1, dtype=self.A_log.dtype, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand_as(self.A_log))
        nn.init.ones_(self.D)
        nn.init.ones_(self.out_norm_weight)
        nn.init.zeros_(self.out_norm_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C).transpose(1, 2).to(
            compute_dtype(x), memory_format=torch.contiguous_format)
        return self.forward_tokens(tokens, (H, W))

    def forward_tokens(self, tokens: torch.Tensor, spatial_shape: Tuple[int, int]) -> torch.Tensor:
        """tokens: (B, C, L) contiguous, channel-major, in the matmuls' dtype (the layer's input
        norm writes them so) -> (B, H, W, C), a view of channel-major memory."""
        B, C, L = tokens.shape
        H, W = spatial_shape
        # Group-major, channel-major (B, G, d, L) from the input projection to the output
        # projection: the layout of the scan and of the depthwise convolution, in which every
        # projection is one batched matmul over the groups. The output stays a channel-major
        # view that the layer's tail reads in place.
        out = grouped_ss2d(tokens, (H, W), self.in_proj_weight, self.conv.weight, self.conv.bias,
                           self.x_proj_weight, self.dt_proj_weight, self.dt_bias, self.A_log,
                           self.D, self.out_norm_weight, self.out_norm_bias,
                           self.out_proj_weight, _INNER_NORM_EPS, SCAN_DIRECTIONS)
        return out.view(B, C, H, W).permute(0, 2, 3, 1)


class ChannelAffinity(nn.Module):
    """Squeeze-excitation style channel weights from channel means: (B, C) -> (B, C) in (0, 1).

    Computed in the weights' dtype (float32 unless the model was cast) whatever the autocast:
    the matrices are (B, C) x (C, C / 16), where autocast's casts would be most of the work. On
    CUDA one kernel each way (:func:`..ops.fused.channel_affinity`).
    """

    reduction = 16

    def __init__(self, embed_dims: int):
        super().__init__()
        self.reduce = nn.Linear(embed_dims, embed_dims // self.reduction)
        self.expand = nn.Linear(embed_dims // self.reduction, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_affinity(x, self.reduce.weight, self.reduce.bias, self.expand.weight,
                                self.expand.bias)


class GroupMambaLayer(nn.Module):
    """The token mixer of a block: (B, H, W, C) -> (B, H, W, C).

    One LayerNorm normalises both the input and the modulated mixer output. The scan output is
    multiplied (not added) by ``skip_scale * LN(x)``, as in the official model. Without CAM
    (``with_cam=False``, the paper's ablation) the groups' outputs go unmodulated.
    """

    def __init__(self, embed_dims: int, with_cam: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dims, eps=_INNER_NORM_EPS)
        self.channel_affinity = ChannelAffinity(embed_dims) if with_cam else None
        self.ssm = GroupedSS2D(embed_dims)
        self.skip_scale = nn.Parameter(torch.ones(1))
        self.proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The norm also writes the channel-major copy the mixer computes on, and the channel
        # means.
        x, tokens, mean = mixer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps,
                                     compute_dtype(x), self.channel_affinity is not None)
        affinity = None if self.channel_affinity is None else self.channel_affinity(mean)
        # LayerNorm(x * skip_scale * ssm(x) * affinity), the products and the norm in one pass.
        m = self.ssm.forward_tokens(tokens, x.shape[1:3])
        y = modulate_norm(x, m, self.skip_scale, affinity, self.norm.weight, self.norm.bias,
                          self.norm.eps)
        return linear(y, self.proj.weight, self.proj.bias)


class FFN(nn.Module):
    """fc1 -> [depthwise 3x3 conv] -> GELU -> fc2 on (B, H, W, C) tokens.

    Training keeps only the input for backward and recomputes the rest there (``ops.fused.ffn``):
    the hidden map is the model's widest activation.
    """

    def __init__(self, embed_dims: int, hidden_dims: int, with_dwconv: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.dwconv = (nn.Conv2d(hidden_dims, hidden_dims, 3, padding=1, groups=hidden_dims)
                       if with_dwconv else None)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (None, None) if self.dwconv is None else (self.dwconv.weight, self.dwconv.bias)
        return ffn(x, self.fc1.weight, self.fc1.bias, *conv, self.fc2.weight, self.fc2.bias)


class GroupMambaBlock(nn.Module):
    """x + DropPath(GroupMambaLayer(x)); x + DropPath(FFN(LN(x))) on (B, H, W, C) tokens.

    Stochastic depth drops each branch per image with probability ``drop_path`` and scales the
    kept ones by ``1 / (1 - drop_path)``, as timm's ``DropPath``; both branches' masks come from
    one draw and are applied in the residual sums (two kernels forward instead of six).
    """

    def __init__(self, embed_dims: int, mlp_ratio: float, drop_path: float = 0.,
                 with_cam: bool = True):
        super().__init__()
        self.mixer = GroupMambaLayer(embed_dims, with_cam)
        self.norm = nn.LayerNorm(embed_dims, eps=_NORM_EPS)
        self.ffn = FFN(embed_dims, int(embed_dims * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.mixer(x)
        scales = self._kept_branch_scales(branch)
        # The residual sum (the branch scaled per image) and the FFN's norm in one pass; the FFN
        # computes in the compute dtype, which the norm writes (not float32).
        x, h = add_layer_norm(x, branch, self.norm.weight, self.norm.bias, self.norm.eps,
                              compute_dtype(x), branch_scale=None if scales is None else scales[0])
        if scales is None:
            return x + self.ffn(h)
        return torch.addcmul(x, self.ffn(h), scales[1, :, None, None, None])

    def _kept_branch_scales(self, branch: torch.Tensor) -> Optional[torch.Tensor]:
        """(2, B): per image, 0 for a dropped branch (mixer, FFN), else 1 / keep; None when
        nothing is dropped (eval, or a rate of 0)."""
        if not self.training or self.drop_path == 0:
            return None
        keep = 1 - self.drop_path
        return branch.new_empty(2, branch.shape[0]).bernoulli_(keep).div_(keep)


class ClassBlock(nn.Module):
    """Post-network of the classifier on the class token (the mean of the last stage's tokens):
    (B, C) -> (B, C). The mixer sees a 1x1 map; its output is normalised before the residual."""

    def __init__(self, embed_dims: int, mlp_ratio: float, with_cam: bool = True):
        super().__init__()
        self.mixer = GroupMambaLayer(embed_dims, with_cam)
        self.mixer_out_norm = nn.LayerNorm(embed_dims, eps=_NORM_EPS)
        self.ffn_norm = nn.LayerNorm(embed_dims, eps=_NORM_EPS)
        self.ffn = FFN(embed_dims, int(embed_dims * mlp_ratio), with_dwconv=False)

    def forward(self, cls_token: torch.Tensor) -> torch.Tensor:
        x = cls_token[:, None, None, :]
        x = x + self.mixer_out_norm(self.mixer(x))
        x = x + self.ffn(self.ffn_norm(x))
        return x.flatten(1)


class Downsample(nn.Module):
    """3x3 stride-2 convolution then LayerNorm: (B, C_in, H, W) -> (B, ceil(H/2), ceil(W/2), C)."""

    def __init__(self, in_channels: int, embed_dims: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(embed_dims, eps=_INNER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _norm(self.norm, dense_conv(self.proj, x).permute(0, 2, 3, 1))


class ConvBNReLU(nn.Sequential):
    """Convolution without bias, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(dense_conv(self.conv, x)))


class Stem(Downsample):
    """7x7/2 then two 3x3 ConvBNReLU, then the stride-2 ``Downsample``: an image
    (B, C_in, H, W) -> tokens at stride 4, (B, H/4, W/4, C) (sizes rounded up)."""

    def __init__(self, in_channels: int, stem_channels: int, embed_dims: int):
        super().__init__(stem_channels, embed_dims)
        self.convs = nn.Sequential(
            ConvBNReLU(in_channels, stem_channels, 7, stride=2),
            ConvBNReLU(stem_channels, stem_channels, 3),
            ConvBNReLU(stem_channels, stem_channels, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels-last from the image on: the BatchNorms of a channels-first bf16 map take a
        # slow generic kernel, and the tokens after the stem are channels-last anyway.
        return super().forward(self.convs(x.contiguous(memory_format=torch.channels_last)))


class GroupMambaStage(nn.Module):
    """[Downsample] -> one block per drop-path rate: (B, H, W, C_in) -> (B, H', W', C) tokens
    before ``self.norm`` (the caller applies it: the classifier needs the last stage without)."""

    def __init__(self, in_channels: Optional[int], embed_dims: int, mlp_ratio: float,
                 drop_path_rates: Sequence[float], with_cp: bool = False,
                 with_cam: bool = True):
        super().__init__()
        self.downsample = Downsample(in_channels, embed_dims) if in_channels else None
        self.blocks = nn.ModuleList(
            GroupMambaBlock(embed_dims, mlp_ratio, rate, with_cam) for rate in drop_path_rates)
        self.norm = nn.LayerNorm(embed_dims, eps=_NORM_EPS)
        self.with_cp = with_cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x.permute(0, 3, 1, 2))
        for block in self.blocks:
            if self.with_cp and torch.is_grad_enabled():
                x = cp.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


@MMDET_MODELS.register_module()
@MMSEG_MODELS.register_module()
@MMENGINE_MODELS.register_module()
class GroupMamba(BaseModule):
    """GroupMamba backbone: a tuple of NCHW feature maps at strides 4, 8, 16, 32.

    Weights of other shapes (another variant) or holding NaN/inf are refused before they load,
    whatever loads them (``weights.check_weights_on_load``); in eval mode, maps holding NaN/inf
    raise ``FloatingPointError``.

    Args:
        arch (str | dict): 'tiny', 'small', 'base', or a dict with ``embed_dims``, ``depths``,
            ``stem_channels`` and ``mlp_ratios``.
        in_channels (int): channels of the input image.
        out_indices (Sequence[int]): stages (0..3) whose maps are returned, each after its
            stage's LayerNorm.
        frozen_stages (int): -1 freezes nothing, 0 the stem, k the stem and stages 0..k-1.
        norm_eval (bool): keep the stem's BatchNorms in eval mode while training.
        with_cp (bool): gradient checkpointing per block.
        with_cam (bool): channel affinity modulation in every layer; ``False`` is the paper's
            ablation without it (other weights, no official checkpoint).
        torch_compile (bool | str | dict): run the backbone as one ``torch.compile`` graph
            (faster and leaner training and inference on CUDA; the first steps compile, a few
            minutes). ``True``, a mode name (``'reduce-overhead'``: CUDA graphs for fixed input
            sizes) or ``dict(mode, dynamic, backend, devices)``; ``dynamic=True`` compiles one
            graph for every image size (detection). See ``models.compiling``.
        drop_path_rate (float): stochastic depth, linearly increasing over all blocks.
        init_cfg (dict, optional): e.g.
            ``dict(type='Pretrained', checkpoint=..., prefix='backbone.')``.
    """

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 norm_eval: bool = False,
                 with_cp: bool = False,
                 drop_path_rate: float = 0.,
                 with_cam: bool = True,
                 torch_compile: Union[bool, str, dict] = False,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg=init_cfg)
        settings = resolve_arch(arch)
        self.embed_dims = settings['embed_dims']
        self.depths = settings['depths']
        self.mlp_ratios = settings['mlp_ratios']
        self.out_indices = tuple(out_indices)
        if not all(0 <= i < 4 for i in self.out_indices):
            raise ValueError(f'out_indices must lie in 0..3, got {self.out_indices}')
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f'frozen_stages must lie in -1..4, got {frozen_stages}')
        self.in_channels = in_channels
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.compile_settings = resolve_compile(torch_compile)

        self.stem = Stem(in_channels, settings['stem_channels'], self.embed_dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(self.depths), device='cpu').tolist()
        self.stages = nn.ModuleList()
        for i, (dims, depth) in enumerate(zip(self.embed_dims, self.depths)):
            first = sum(self.depths[:i])
            self.stages.append(GroupMambaStage(
                self.embed_dims[i - 1] if i else None, dims, self.mlp_ratios[i],
                rates[first:first + depth], with_cp, with_cam))
        self.apply(_init_weights)
        self._freeze_stages()
        check_weights_on_load(self)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f'GroupMamba expects images (B, {self.in_channels}, H, W), '
                             f'got shape {tuple(x.shape)}')

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """x: (B, in_channels, H, W) -> maps (B, embed_dims[i], ~H/2^(i+2), ~W/2^(i+2))."""
        self._check_input(x)
        tokens = self._run_features(x, max(self.out_indices, default=-1) + 1, True)
        outs = tuple(tokens[i].permute(0, 3, 1, 2).contiguous() for i in self.out_indices)
        check_outputs_finite(self, outs, [f'stage {i}' for i in self.out_indices])
        return outs

    def forward_last_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> the last stage's tokens before its norm, (B, h, w, C)."""
        self._check_input(x)
        return self._run_features(x, len(self.stages), False)[-1]

    def _run_features(self, x: torch.Tensor, num_stages: int,
                      norm_last: bool) -> List[torch.Tensor]:
        settings = self.compile_settings
        if settings is not None and x.device.type in settings['devices']:
            return run_compiled(GroupMamba._features, settings, x, self, x, num_stages, norm_last)
        return self._features(x, num_stages, norm_last)

    def _features(self, x: torch.Tensor, num_stages: int, norm_last: bool) -> List[torch.Tensor]:
        """Stem and the first ``num_stages`` stages: each stage's (B, h, w, C) tokens after its
        norm (the last one's only if ``norm_last``)."""
        x = self.stem(x)
        outs = []
        for i, stage in enumerate(self.stages[:num_stages]):
            x = stage(x)
            if norm_last or i < num_stages - 1:
                x = _norm(stage.norm, x)
            outs.append(x)
        return outs

    def _frozen_modules(self) -> List[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem, *self.stages[:self.frozen_stages]]

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'GroupMamba':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.stem.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self


class GroupMambaClassifier(nn.Module):
    """The ImageNet classifier: backbone, class-token block, final norm (the last stage's) and
    heads. ``forward(images)`` returns ``(logits, dist_logits)`` while training and their mean in
    eval mode, or only ``logits`` without distillation; each (B, num_classes).

    Weights are checked before they load, outputs in eval mode, as for ``GroupMamba``; the
    classifier's check covers its backbone's keys, whose own is removed.

    Args:
        arch, drop_path_rate, with_cp, with_cam, torch_compile: as for ``GroupMamba``.
        num_classes (int): classes of both heads.
        distillation (bool): a second (distillation) head, averaged with the first in eval mode.
    """

    def __init__(self, arch: Union[str, dict] = 'tiny', num_classes: int = 1000,
                 distillation: bool = True, drop_path_rate: float = 0., with_cp: bool = False,
                 with_cam: bool = True, torch_compile: Union[bool, str, dict] = False):
        super().__init__()
        self.backbone = GroupMamba(arch, drop_path_rate=drop_path_rate, with_cp=with_cp,
                                   with_cam=with_cam, torch_compile=torch_compile)
        dims = self.backbone.embed_dims[-1]
        self.class_block = ClassBlock(dims, self.backbone.mlp_ratios[-1], with_cam)
        self.head = nn.Linear(dims, num_classes)
        self.dist_head = nn.Linear(dims, num_classes) if distillation else None
        self.class_block.apply(_init_weights)
        self.head.apply(_init_weights)
        if self.dist_head is not None:
            self.dist_head.apply(_init_weights)
        check_weights_on_load(self)

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.backbone.stages[-1].norm

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) -> the normalised class token (B, C)."""
        tokens = self.backbone.forward_last_tokens(images)
        return self.final_norm(self.class_block(tokens.mean(dim=(1, 2))))

    def forward(self, images: torch.Tensor):
        x = self.forward_features(images)
        logits = self.head(x)
        if self.dist_head is not None:
            dist_logits = self.dist_head(x)
            if self.training:
                return logits, dist_logits
            logits = (logits + dist_logits) / 2
        check_outputs_finite(self, [logits], ['logits'])
        return logits
