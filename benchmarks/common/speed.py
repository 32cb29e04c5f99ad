"""Training and inference throughput of image models on one GPU (or the CPU).

Timing follows the usual rules for asynchronous devices: warm-up steps first (compilation, cuDNN
autotuning, allocator growth), then many timed steps between synchronisations, and the median of
several timed windows. Inputs are random normal images, never zeros.
"""
import re
import statistics
import time
from collections import defaultdict
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _median_step_seconds(step: Callable[[], None], device: torch.device, warmup: int,
                         steps: int, windows: int = 3) -> Tuple[float, float]:
    """(median seconds per step, seconds of the warm-up steps: compilation shows there)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), warmup_seconds


def peak_gib(device: torch.device) -> Optional[float]:
    """GPU memory allocated at the peak since the last reset, in GiB (None on the CPU)."""
    if device.type != 'cuda':
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _logits_loss(outputs, labels, teacher_labels=None):
    """Cross-entropy on a classifier's output; a (head, distillation head) pair is trained
    as in hard distillation (the distillation head on the teacher's argmax when given)."""
    if isinstance(outputs, (tuple, list)):
        head, dist = outputs
        dist_target = labels if teacher_labels is None else teacher_labels
        return 0.5 * F.cross_entropy(head, labels) + 0.5 * F.cross_entropy(dist, dist_target)
    return F.cross_entropy(outputs, labels)


def training_step(model: torch.nn.Module,
                  batch_size: int,
                  image_size: int = 224,
                  num_classes: int = 1000,
                  amp_dtype: Optional[torch.dtype] = torch.bfloat16,
                  teacher: Optional[torch.nn.Module] = None,
                  device: str = 'cuda') -> Callable[[], None]:
    """A closure running one training step (forward, loss, backward, AdamW step) on random
    data under autocast ``amp_dtype`` (None: full precision). A ``teacher`` adds its no-grad
    forward to every step, as hard distillation does."""
    device = torch.device(device)
    model = model.to(device).train()
    if teacher is not None:
        teacher = teacher.to(device).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, num_classes, (batch_size, ), device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def step():
        with autocast:
            teacher_labels = None
            if teacher is not None:
                with torch.no_grad():
                    teacher_labels = teacher(images).argmax(dim=1)
            loss = _logits_loss(model(images), labels, teacher_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure_training(model: torch.nn.Module,
                     batch_size: int,
                     image_size: int = 224,
                     num_classes: int = 1000,
                     amp_dtype: Optional[torch.dtype] = torch.bfloat16,
                     teacher: Optional[torch.nn.Module] = None,
                     warmup: int = 5,
                     steps: int = 10,
                     device: str = 'cuda') -> Dict[str, Optional[float]]:
    """Images per second, peak memory and warm-up time of :func:`training_step`."""
    step = training_step(model, batch_size, image_size, num_classes, amp_dtype, teacher, device)
    return _timed(step, batch_size, torch.device(device), warmup, steps)


def _timed(step: Callable[[], None], batch_size: int, device: torch.device, warmup: int,
           steps: int) -> Dict[str, Optional[float]]:
    """Images per second, step time, peak memory and warm-up time of repeated ``step()``."""
    _reset_peak(device)
    seconds, warmup_seconds = _median_step_seconds(step, device, warmup, steps)
    return dict(images_per_s=batch_size / seconds, step_ms=seconds * 1e3,
                peak_gib=peak_gib(device), warmup_s=warmup_seconds)


# Kinds of CUDA kernels by name, first match wins: the project's Triton kernels (scan, depthwise
# convolution), Inductor's generated kernels (pointwise, reductions), cuBLAS / CUTLASS GEMMs, cuDNN
# convolutions, the optimizer.
_KERNEL_KINDS = (
    ('selective scan', r'scan'),
    ('depthwise conv', r'dwconv'),
    ('Inductor pointwise', r'^triton_poi'),
    ('Inductor reduction', r'^triton_(red|per)'),
    ('other Triton', r'^triton'),
    ('GEMM', r'gemm|nvjet|cutlass|xmma|cublas|splitKreduce'),
    ('convolution', r'conv|cudnn|dgrad|wgrad|implicit'),
    ('optimizer', r'multi_tensor_apply'),
    ('normalization', r'norm'),
    ('copy', r'copy'),
)


def kernel_kind(name: str) -> str:
    """The kind of a CUDA kernel by its name (see ``_KERNEL_KINDS``); 'other' when none fits."""
    for kind, pattern in _KERNEL_KINDS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return kind
    return 'other'


def profile_training(model: torch.nn.Module, batch_size: int, warmup: int = 5, steps: int = 3,
                     timed_steps: int = 0, **kwargs):
    """A ``torch.profiler`` trace (CPU and CUDA activity) of ``steps`` training steps after
    ``warmup`` untraced ones; keyword arguments as :func:`training_step`.

    Returns ``(profile, timing)``: with ``timed_steps`` > 0 the untraced steps are also timed as
    in :func:`measure_training` before tracing (``timing`` as its result, else None), so that one
    process (one compilation) gives both the throughput and the profile.
    """
    step = training_step(model, batch_size, **kwargs)
    device = torch.device(kwargs.get('device', 'cuda'))
    timing = None
    if timed_steps > 0:
        timing = _timed(step, batch_size, device, warmup, timed_steps)
    else:
        for _ in range(warmup):
            step()
    return trace_steps(step, device, steps), timing


def trace_steps(step: Callable[[], None], device: torch.device, steps: int):
    """A ``torch.profiler`` trace (CPU activity, and CUDA activity on a GPU) of ``steps`` calls
    of ``step``, from a synchronised start to a synchronised end."""
    synchronize(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == 'cuda':
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    return prof


def profile_summary(prof, steps: int, kernels: int = 25) -> str:
    """Per-step summary of a ``torch.profiler`` trace of ``steps`` steps with CUDA activity: the
    kernel time by kind, the most expensive kernels, and the step's wall time (first to last
    kernel) against its summed kernel time; the difference is launch gaps and host time."""
    # Device-side events minus the annotations the optimizer and autograd place on the GPU timeline.
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
              and not getattr(e, 'is_user_annotation', False)]
    if not events:
        return 'no CUDA kernels in the trace'
    kernel_ms = sum(e.device_time for e in events) / 1e3 / steps
    by_kind, by_name = defaultdict(lambda: [0., 0]), defaultdict(lambda: [0., 0])
    for event in events:
        for table, key in ((by_kind, kernel_kind(event.name)), (by_name, event.name)):
            table[key][0] += event.device_time / 1e3 / steps
            table[key][1] += 1
    lines = ['kernel time per step by kind:']
    for kind, (ms, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        lines.append(f'  {kind:<20} {ms:8.2f} ms {100 * ms / kernel_ms:5.1f}%  '
                     f'{count // steps:5d} launches')
    lines.append(f'top {kernels} kernels per step:')
    for name, (ms, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:kernels]:
        lines.append(f'  {ms:7.2f} ms {count // steps:4d}x  {kernel_kind(name):<18} {name[:110]}')
    scan_ms = by_kind['selective scan'][0]
    wall_ms = (max(e.time_range.end for e in events)
               - min(e.time_range.start for e in events)) / 1e3 / steps
    lines.append(f'per step: {wall_ms:.1f} ms wall (first to last kernel), {kernel_ms:.1f} ms in '
                 f'{len(events) // steps} kernels ({100 * kernel_ms / wall_ms:.0f}% busy), '
                 f'scan {scan_ms:.1f} ms ({100 * scan_ms / kernel_ms:.1f}%)')
    return '\n'.join(lines)


def measure_inference(model: torch.nn.Module,
                      batch_size: int,
                      image_size: int = 224,
                      dtype: torch.dtype = torch.float32,
                      warmup: int = 5,
                      steps: int = 20,
                      device: str = 'cuda') -> Dict[str, Optional[float]]:
    """Images per second of eval-mode forwards; low-precision ``dtype`` runs under autocast."""
    device = torch.device(device)
    model = model.to(device).eval()
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    low_precision = dtype != torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=low_precision)

    def step():
        with torch.inference_mode(), autocast:
            model(images)

    return _timed(step, batch_size, device, warmup, steps)
