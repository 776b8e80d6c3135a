"""Pre-training's step memory. On the CPU it is judged before the first step, where running out would have the
system end the run (or swap for hours) with nothing said: MiM, whose crop makes 21 volumes for one graph (about 56
GiB a step of its packaged recipe), keeps the activations of as few volumes at a time as fit and recomputes them in
the backward pass (the same loss and gradients); a step of the other methods cannot be split, so they are warned
of. Not one volume fitting is refused. On a GPU, a MiM step that runs out of memory runs again keeping fewer."""

from __future__ import annotations

from ..errors import UserError
from ..masking import masked_count
from ..memory import GIB
from ..progress import Reporter
from ..training.cropgroups import BYTES_PER_PARAMETER, RESERVE_BYTES, crop_bytes, step_halving_on_gpu_memory
from .hybridmim import REGIONS_PER_AXIS, HybridMIM
from .mim import MiM

KEPT_BYTES = 4  # a float32 voxel of what each volume's pass keeps for the loss: its input, output, decoder feature
# HybridMIM's U-Net decodes a block of (decoder_regions / 3)³ of its crop. Measured (pretrain-step-cpu-batch2.json in
# docs/benchmarks: 2 crops of 96³, U-Net 32 wide): a peak of 4.0 GiB decoding the 64³ block, 5.7 GiB decoding the
# whole crop, so decoding takes about 47 of a voxel and channel's 100 bytes (training.cropgroups.crop_bytes).
UNET_DECODER_SHARE = 0.47


def volumes_per_crop(method) -> int:
    """The volumes a crop sends through the network: MiM's coarse one, its hidden octants, their patches."""
    if not isinstance(method, MiM):
        return 1
    middle = masked_count(8, method.octant_ratio)
    return 1 + middle + middle * method.fine_per_volume


def _decoded_share(method, network: dict) -> float:
    """The share of a whole crop's forward and backward that a step's pass takes: less for HybridMIM's U-Net,
    which decodes only a block (measured on the U-Net alone)."""
    if not isinstance(method, HybridMIM) or network.get("name") != "unet":
        return 1.0
    decoded = (method.decoder_regions / REGIONS_PER_AXIS) ** 3
    return 1 - UNET_DECODER_SHARE + UNET_DECODER_SHARE * decoded


def fit_cpu_memory(method, network: dict, channels: int, crops: int, available: int | None,
                   reporter: Reporter) -> None:
    """Check that a step of ``crops`` crops of ``channels`` channels through ``method`` (built from the ``network``
    spec) fits in ``available`` bytes (None: not known, nothing checked); MiM's ``recompute`` is set to the volumes
    that fit at a time."""
    if available is None:
        return
    window = (method.window_size,) * 3
    per_volume = int(crop_bytes(network, window) * _decoded_share(method, network))
    learnt = sum(p.numel() for p in method.parameters() if p.requires_grad)
    held = sum(p.numel() for p in method.parameters() if not p.requires_grad)  # SelfMedHPM's teacher
    fixed = RESERVE_BYTES + BYTES_PER_PARAMETER * learnt + 4 * held
    volumes = crops * volumes_per_crop(method)
    size = "×".join(map(str, window))
    needed = fixed + volumes * per_volume
    if needed <= available:
        return
    if isinstance(method, MiM):
        width = int(network.get("features", [16])[0])
        fixed += volumes * KEPT_BYTES * (width + 2 * channels) * window[0] ** 3
        at_once = int((available - fixed) // per_volume)
        if at_once < 1:
            raise UserError(f"MiM's {volumes} volumes of {size} a step need about {(fixed + per_volume) / GIB:.1f} "
                            f"GiB of memory even one at a time and {available / GIB:.1f} GiB is available; close "
                            "other programs, or take fewer crops a step (train.volumes_per_step in a recipe)")
        if method.recompute and method.recompute <= at_once:
            return
        method.recompute = at_once
        reporter.warning(f"MiM's {volumes} volumes of {size} a step would need about {needed / GIB:.1f} GiB of "
                         f"memory and {available / GIB:.1f} GiB is available: their activations are kept {at_once} "
                         "at a time and recomputed in the backward pass (the same loss, one more forward pass)")
        return
    if fixed + per_volume > available:
        raise UserError(f"a pre-training crop of {size} voxels needs about {(fixed + per_volume) / GIB:.1f} GiB of "
                        f"memory and {available / GIB:.1f} GiB is available; close other programs, or pre-train "
                        "on a GPU")
    reporter.warning(f"the {crops} crops of {size} of a step may need up to about {needed / GIB:.1f} GiB of memory and "
                     f"{available / GIB:.1f} GiB is available: the system may slow down or end the run; close "
                     "other programs, or take fewer crops a step (train.crops_per_volume in a recipe)")


def mim_step_within_gpu_memory(run_step, method: MiM, crops: int, clear_gradients, reporter: Reporter):
    """``run_step()``'s result; each time the GPU runs out of memory the same step runs again with the activations
    of half as many volumes kept at a time (recomputed in the backward pass: the same loss). ``method.recompute``
    keeps the number for the steps after."""
    volumes = crops * volumes_per_crop(method)
    # halved from the step's volumes at most: a recompute above them holds them all in one chunk, as their number does
    first = min(method.recompute or volumes, volumes)

    def keeping(kept: int):
        if kept != first:  # the first try as set: a recipe's recompute of more than the volumes is not 0 (all kept)
            method.recompute = kept
        return run_step()

    size = "×".join(map(str, (method.window_size,) * 3))
    refusal = (f"out of GPU memory with one MiM volume of {size} at a time: pre-train on fewer crops a step "
               "(train.volumes_per_step, train.crops_per_volume in a recipe) or on the CPU (--device cpu)")
    return step_halving_on_gpu_memory(keeping, first, clear_gradients, reporter, "volumes' activations kept",
                                      refusal)[0]
