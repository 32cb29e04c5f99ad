"""GroupMamba backbone and classifier.

Most tests use a narrow custom arch so that they run in seconds on a CPU; parameter counts of the
real variants are checked on the meta device.
"""
import math

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

from conftest import SMALL_ARCH, randomize
from mmgroupmamba.models import GroupMamba, GroupMambaClassifier
from mmgroupmamba.models import groupmamba as groupmamba_module

ARCH = SMALL_ARCH


def expected_size(size, stage):
    """Spatial size after the stem (two stride-2 convs) and ``stage`` more stride-2 convs."""
    for _ in range(stage + 2):
        size = math.ceil(size / 2)
    return size



@pytest.mark.parametrize('size', [(64, 64), (255, 255), (112, 137), (33, 47), (7, 5)])
def test_output_shapes(size):
    model = GroupMamba(ARCH).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, *size))
    assert len(outs) == 4
    for stage, (out, dims) in enumerate(zip(outs, ARCH['embed_dims'])):
        assert out.shape == (2, dims, expected_size(size[0], stage), expected_size(size[1], stage))
        assert out.is_contiguous() and torch.isfinite(out).all()


@pytest.mark.parametrize('dtype', [torch.float64, torch.bfloat16])
def test_a_cast_model_computes_in_its_dtype(dtype):
    """model.double() (the reference of the GPU tests) or .bfloat16() runs forward and backward
    in that dtype, the channel affinity included, and agrees with float32."""
    torch.manual_seed(0)
    model = randomize(GroupMamba(ARCH)).train()
    cast = GroupMamba(ARCH).to(dtype).train()
    cast.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 48, 40)
    outs, cast_outs = model(images), cast(images.to(dtype))
    sum(out.sum() for out in cast_outs).backward()
    tol = 1e-5 if dtype == torch.float64 else 0.1
    for out, cast_out in zip(outs, cast_outs):
        assert cast_out.dtype == dtype
        error = (cast_out.double() - out.double()).norm() / out.double().norm()
        assert error < tol
    assert all(p.grad is not None and p.grad.dtype == dtype for p in cast.parameters()
               if p.requires_grad)


def test_out_indices_and_named_arch():
    model = GroupMamba(ARCH, out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [o.shape[1:] for o in outs] == [(32, 8, 12), (64, 2, 3)]
    # The last map is the final norm of the last stage: zero mean over channels per position.
    assert outs[1].mean(dim=1).abs().max() < 1e-5

    tiny = GroupMamba('tiny', out_indices=(3,)).eval()
    with torch.no_grad():
        assert tiny(torch.randn(1, 3, 32, 32))[0].shape == (1, 448, 1, 1)
    with torch.device('meta'):
        for arch, dims in [('small', (64, 128, 348, 512)), ('base', (96, 192, 424, 512))]:
            model = GroupMamba(arch)
            assert [stage.norm.weight.shape[0] for stage in model.stages] == list(dims)


@pytest.mark.parametrize('frozen_stages', [0, 2, 4])
def test_frozen_stages(frozen_stages):
    model = GroupMamba(ARCH, frozen_stages=frozen_stages)
    model.train()
    frozen = [model.stem, *model.stages[:frozen_stages]]
    trainable = model.stages[frozen_stages:]
    for module in frozen:
        assert all(not p.requires_grad for p in module.parameters())
        assert all(not m.training for m in module.modules())
    for module in trainable:
        assert all(p.requires_grad for p in module.parameters())
        assert all(m.training for m in module.modules())
    running_mean = model.stem.convs[0].bn.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(model.stem.convs[0].bn.running_mean, running_mean)


def test_norm_eval():
    model = GroupMamba(ARCH, norm_eval=True)
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 3 and not any(bn.training for bn in bns)
    assert model.training and model.stages[0].training
    assert all(p.requires_grad for p in model.parameters())
    running_var = bns[0].running_var.clone()
    model(torch.randn(2, 3, 32, 32))
    assert torch.equal(bns[0].running_var, running_var)
    # Without norm_eval the statistics move.
    model = GroupMamba(ARCH).train()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(model.stem.convs[0].bn.running_var, torch.ones(8))


def test_with_cp_gives_identical_gradients(monkeypatch):
    calls = []
    checkpoint = groupmamba_module.cp.checkpoint
    monkeypatch.setattr(groupmamba_module.cp, 'checkpoint',
                        lambda *args, **kwargs: calls.append(1) or checkpoint(*args, **kwargs))
    plain = randomize(GroupMamba(ARCH, drop_path_rate=0.3)).train()
    checkpointed = GroupMamba(ARCH, drop_path_rate=0.3, with_cp=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 40, 36)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)  # same drop-path masks
        sum((out ** 2).mean() for out in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert len(calls) == sum(ARCH['depths'])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize('with_cp', [False, True])
def test_backbone_traces_as_one_graph(with_cp):
    """What ``torch_compile=True`` compiles on CUDA traces without a graph break (the scan is a
    custom operator with autograd and shape functions) and gives eager's outputs and gradients."""
    torch._dynamo.reset()
    model = randomize(GroupMamba(ARCH, with_cp=with_cp)).train()
    x = torch.randn(2, 3, 40, 36, requires_grad=True)
    features = groupmamba_module.GroupMamba._features
    traced_features = torch.compile(features, backend='aot_eager', fullgraph=True)
    results = []
    for run in (features, traced_features):
        outs = run(model, x, 4, True)
        loss = sum((out ** 2).mean() for out in outs)
        results.append([loss, *torch.autograd.grad(loss, [x, *model.parameters()])])
    for traced, eager in zip(results[1], results[0]):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)


def test_compiled_graphs_call_convolutions_as_opaque_operators():
    """No aten convolution reaches the compiler, forward or backward: Inductor's own lowering of
    a convolution's backward specialises the graph on the image size."""
    torch._dynamo.reset()
    model = GroupMamba(ARCH).train()
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == 'call_function')
        return gm.forward

    def backend(gm, example_inputs):
        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)

    compiled = torch.compile(groupmamba_module.GroupMamba._features, backend=backend)
    outs = compiled(model, torch.randn(2, 3, 40, 36), 4, True)
    sum(out.sum() for out in outs).backward()
    assert not [t for t in targets if 'aten.convolution' in t]
    # The stem's three ConvBNReLU and the four stride-2 projections, forward and backward.
    for op in ('opaque_conv2d_fwd', 'opaque_conv2d_bwd'):
        assert sum(op in t for t in targets) == 7, op


def test_drop_path_schedule():
    model = GroupMamba(ARCH, drop_path_rate=0.25)
    blocks = [block for stage in model.stages for block in stage.blocks]
    rates = [block.drop_path for block in blocks]
    expected = [0.25 * i / (len(blocks) - 1) for i in range(len(blocks))]
    assert rates == pytest.approx(expected)


def test_drop_path_drops_each_branch_per_image():
    """Training with stochastic depth: per image, each branch is dropped or kept (scaled by
    1 / keep) as timm's DropPath does, from one (2, B) draw; eval drops nothing."""
    from mmgroupmamba.models.groupmamba import GroupMambaBlock
    torch.manual_seed(0)
    block = randomize(GroupMambaBlock(16, 2., drop_path=0.5)).train()
    x = torch.randn(32, 5, 6, 16)
    torch.manual_seed(1)
    out = block(x)
    torch.manual_seed(1)
    scales = torch.empty(2, 32).bernoulli_(0.5).div_(0.5)
    assert set(scales.unique().tolist()) == {0., 2.}
    # The same block without dropping, its branches rebuilt and scaled by hand.
    mixed = x + block.mixer(x) * scales[0, :, None, None, None]
    ffn_out = block.ffn(block.norm(mixed))
    expected = mixed + ffn_out * scales[1, :, None, None, None]
    torch.testing.assert_close(out, expected)
    kept_mixer = scales[0] > 0
    assert 0 < kept_mixer.sum() < 32  # both cases occur
    block.eval()
    mixed = x + block.mixer(x)
    torch.testing.assert_close(block(x), mixed + block.ffn(block.norm(mixed)))


@pytest.mark.parametrize('arch,count', [('tiny', 23_361_917), ('small', 34_781_555),
                                        ('base', 57_150_838)])
def test_classifier_parameter_count_matches_official(arch, count):
    with torch.device('meta'):
        model = GroupMambaClassifier(arch)
    assert sum(p.numel() for p in model.parameters()) == count


def test_classifier_outputs():
    model = randomize(GroupMambaClassifier(ARCH, num_classes=10))
    x = torch.randn(2, 3, 48, 40)
    logits, dist_logits = model.train()(x)
    assert logits.shape == dist_logits.shape == (2, 10)
    assert not torch.allclose(logits, dist_logits)
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(
            model(x), (model.head(features) + model.dist_head(features)) / 2)
    single = GroupMambaClassifier(ARCH, num_classes=10, distillation=False).eval()
    with torch.no_grad():
        assert single(x).shape == (2, 10)
    assert not any(k.startswith('dist_head') for k in single.state_dict())
    assert all(k.startswith(('backbone.', 'class_block.', 'head.', 'dist_head.'))
               for k in model.state_dict())


def test_without_cam_the_layers_are_unmodulated():
    """``with_cam=False`` (the paper's ablation) drops CAM's weights everywhere, and each layer
    equals the full one with the modulation set to 1."""
    torch.manual_seed(0)
    full = randomize(GroupMambaClassifier(ARCH, num_classes=10)).eval()
    ablated = GroupMambaClassifier(ARCH, num_classes=10, with_cam=False).eval()
    kept = {k: v for k, v in full.state_dict().items() if 'channel_affinity' not in k}
    assert set(kept) == set(ablated.state_dict())
    assert len(kept) < len(full.state_dict())
    ablated.load_state_dict(kept)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        assert not torch.allclose(full(x), ablated(x))
        for layer in full.modules():
            if isinstance(layer, groupmamba_module.ChannelAffinity):
                layer.forward = lambda means: torch.ones_like(means)
        torch.testing.assert_close(full(x), ablated(x))
    backbone = GroupMamba(ARCH, with_cam=False)
    assert not any('channel_affinity' in k for k in backbone.state_dict())


def test_registered_in_openmmlab_registries():
    from mmdet.registry import MODELS as MMDET_MODELS
    from mmengine.registry import MODELS as MMENGINE_MODELS
    from mmseg.registry import MODELS as MMSEG_MODELS
    for registry in (MMDET_MODELS, MMSEG_MODELS, MMENGINE_MODELS):
        model = registry.build(dict(type='GroupMamba', arch=ARCH, out_indices=(2,)))
        assert isinstance(model, GroupMamba) and model.out_indices == (2,)


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(arch='huge'), KeyError, 'huge'),
    (dict(arch={**ARCH, 'embed_dims': (16, 32, 50, 64)}), ValueError, 'divisible'),
    (dict(arch={**ARCH, 'depth': (1, 1, 1, 1)}), KeyError, 'keys'),
    (dict(out_indices=(0, 4)), ValueError, 'out_indices'),
    (dict(frozen_stages=5), ValueError, 'frozen_stages'),
    (dict(frozen_stages=-2), ValueError, 'frozen_stages'),
    (dict(torch_compile='fastest'), ValueError, 'reduce-overhead'),
    (dict(torch_compile=dict(dynamc=True)), ValueError, r"unknown keys \['dynamc'\]"),
])
def test_misconfiguration_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        GroupMamba(**{'arch': ARCH, **kwargs})


def test_failed_compilation_names_the_eager_switch():
    """A backend that cannot compile (no C compiler, an Inductor bug) stops with the setting
    that runs the backbone eagerly; the original error stays attached."""
    from torch._dynamo.exc import BackendCompilerFailed

    def no_compiler(graph, example_inputs):
        raise OSError('no C compiler found')

    torch._dynamo.reset()
    model = GroupMamba(ARCH, torch_compile=dict(backend=no_compiler, devices=('cpu', )))
    with pytest.raises(RuntimeError, match='torch_compile=False') as info:
        model(torch.randn(1, 3, 32, 32))
    assert 'OSError: no C compiler found' in str(info.value)
    assert isinstance(info.value.__cause__, BackendCompilerFailed)


@pytest.mark.parametrize('dynamic,graphs', [(False, [1, 1, 0]), (True, [1, 0, 0])])
def test_dynamic_compiles_one_graph_for_all_sizes(dynamic, graphs):
    """The backbone's own compiled path (traced here by aot_eager on the CPU): with
    ``dynamic`` the first call's graph serves later sizes; without it the first change of size
    compiles again."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = GroupMamba(ARCH, torch_compile=dict(dynamic=dynamic, backend='aot_eager',
                                                devices=('cpu', ))).eval()
    compiled = []
    for size in [(64, 96), (80, 112), (96, 80)]:
        before = counters['stats']['unique_graphs']
        with torch.no_grad():
            outs = model(torch.randn(2, 3, *size))
        compiled.append(counters['stats']['unique_graphs'] - before)
        assert outs[0].shape == (2, ARCH['embed_dims'][0], size[0] // 4, size[1] // 4)
    assert compiled == graphs


def test_wrong_input_channels_are_refused():
    model = GroupMamba(ARCH)
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*\(1, 4, 32, 32\)'):
        model(torch.randn(1, 4, 32, 32))
    assert GroupMamba(ARCH, in_channels=4).eval()(torch.randn(1, 4, 32, 32))[0].shape[1] == 16


def test_ssm_initialisation():
    ssm = GroupMamba(ARCH).stages[3].blocks[0].mixer.ssm
    step = torch.nn.functional.softplus(ssm.dt_bias)
    assert step.min() >= 1e-4 - 1e-7 and step.max() <= 0.1 + 1e-6 and step.std() > 0
    assert torch.equal(ssm.A_log, torch.zeros(64, 1))  # A = -1 for the one state
    assert torch.equal(ssm.D, torch.ones(64))
    assert ssm.dt_proj_weight.abs().max() <= 1  # R = 1: uniform in +-1
    assert ssm.in_proj_weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert ssm.conv.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.2)
    assert not ssm.conv.bias.any()


def test_groups_scan_in_the_official_directions():
    """Group g of a layer scans left_right, top_bottom, right_left, bottom_top for g = 0..3:
    a change at one token reaches exactly the tokens its group's scan visits later."""
    H, W = 5, 6
    ssm = groupmamba_module.GroupedSS2D(32)
    with torch.no_grad():
        # Unit-gain projections (changes far above rounding), a 1x1 identity in place of the
        # 3x3 conv (no spatial mixing besides the scan) and A ~ 0 (no decay along the scan).
        for weight in (ssm.in_proj_weight, ssm.x_proj_weight, ssm.out_proj_weight):
            weight.normal_(0, weight.shape[-1] ** -.5)
        ssm.conv.weight.zero_()[:, :, 1, 1] = 1
        ssm.A_log.fill_(-20.)
        ssm.dt_bias.zero_()
    x = torch.randn(1, H, W, 32)
    changed = x.clone()
    changed[0, 2, 3] += 1
    with torch.no_grad():
        reached = (ssm(changed) - ssm(x))[0].view(H, W, 4, 8).abs().amax(dim=-1) > 0

    i, j = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    row_major, column_major = i * W + j, j * H + i
    visit_step = [row_major, column_major, H * W - 1 - row_major, H * W - 1 - column_major]
    for g, step in enumerate(visit_step):
        assert torch.equal(reached[..., g], step >= step[2, 3]), g
