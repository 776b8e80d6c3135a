"""MiM and SelfMedHPM beside HybridMIM: their masks, levels, losses and teacher, trained a few steps on real CT
crops, resumed exactly, fine-tuned from, and shown by `reconstruct`."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from conftest import REPO, StopsAt, WarningsKept, around_the_tumour, data_file, run_cli_here
from hybridmim.masking import hard_patch_mask, octant_token_mask, patchify, unpatchify
from hybridmim.memory import GIB
from hybridmim.networks import build_network
from hybridmim.preprocessing import Preprocessing
from hybridmim.pretraining.hpm import ranking_loss
from hybridmim.pretraining.mae import denormalise, hidden_pass, token_losses
from hybridmim.errors import UserError
from hybridmim.pretraining import trainer as trainer_module
from hybridmim.pretraining.stepmemory import KEPT_BYTES, fit_cpu_memory, mim_step_within_gpu_memory, volumes_per_crop
from hybridmim.pretraining.run import load_recipe, merge_recipes
from hybridmim.pretraining.trainer import build_method, pretrain
from hybridmim.progress import Reporter, parse_event
from hybridmim.training.cropgroups import BYTES_PER_PARAMETER, RESERVE_BYTES, crop_bytes
from hybridmim.training import runstate
from hybridmim.training.start import resolve_start, transfer_weights
from hybridmim.volumes import load_prepared
from safetensors.torch import load_file
from test_pretraining import mean_term, terms_on_fixed_batches

# The hybrid network at its smallest: convolution stages at strides 1, 2, 4, tokens of 8³ voxels, one block.
TINY_NETWORK = {"features": [4, 8, 8], "embed_dim": 24, "depth": 1, "num_heads": 2}
TINY_TRAIN = {"steps": 6, "volumes_per_step": 1, "crops_per_volume": 2, "lr": 1e-2, "warmup_steps": 2,
              "checkpoint_every": 3, "log_every": 3, "amp": "none", "half_precision": False, "num_threads": 1}
TINY = {
    "mim": {"network": TINY_NETWORK, "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
            "mim": {"patch_size": 8, "volume_size": 32, "fine_per_volume": 2, "hidden_dim": 32, "projection_dim": 16},
            "train": {**TINY_TRAIN, "crops_per_volume": 1}},
    "hpm": {"network": TINY_NETWORK, "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
            "hpm": {"patch_size": 8, "crop_size": 32, "predictor_hidden": 16},
            "train": {**TINY_TRAIN, "crops_per_volume": 4}},
}


def tiny_recipe(method: str, **train) -> dict:
    recipe = merge_recipes(load_recipe(method, None, None), TINY[method])
    recipe["train"].update(train)
    return recipe


def tiny_method(method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_method(tiny_recipe(method), 1)


@pytest.fixture(scope="module")
def ct_crop() -> torch.Tensor:
    """A real abdominal CT block, HU [-1000, 1000] → [0, 1], as a (1, 1, 64, 64, 64) batch."""
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    z, y, x = (max((n - 64) // 2, 0) for n in array.shape)
    block = np.clip((array[z:z + 64, y:y + 64, x:x + 64].astype(np.float32) + 1000) / 2000, 0, 1)
    assert block.shape == (64, 64, 64)
    return torch.from_numpy(block)[None, None]


# --- masks and levels -------------------------------------------------------------------------------------------

def test_octants_are_three_cubed_token_cubes():
    for octant in range(8):
        chosen = torch.zeros(1, 8, dtype=torch.bool)
        chosen[0, octant] = True
        tokens = octant_token_mask(chosen.view(1, 2, 2, 2), 6)[0]
        a, b, c = (octant >> 2) & 1, (octant >> 1) & 1, octant & 1
        expected = torch.zeros(6, 6, 6, dtype=torch.bool)
        expected[3 * a:3 * a + 3, 3 * b:3 * b + 3, 3 * c:3 * c + 3] = True
        assert torch.equal(tokens, expected), octant
    first = octant_token_mask(torch.tensor([True] + [False] * 7).view(1, 2, 2, 2), 6)[0].flatten()
    assert first.nonzero().flatten().tolist()[:6] == [0, 1, 2, 6, 7, 8]  # not the official 0..26
    assert int(first.sum()) == 27


def test_each_level_is_cut_from_the_region_hidden_above(ct_crop):
    mim = tiny_method("mim")  # 32³ volumes of 8³ tokens from 64³ crops
    choices = mim.sample(1, torch.Generator().manual_seed(3))
    valid = torch.ones_like(ct_crop)
    levels = mim.levels(ct_crop, valid, **choices)
    coarse, _, coarse_mask = levels["coarse"]
    middle, _, middle_mask = levels["middle"]
    fine, _, fine_mask = levels["fine"]
    assert (coarse.shape, middle.shape, fine.shape) == ((1, 1, 32, 32, 32), (4, 1, 32, 32, 32), (8, 1, 32, 32, 32))
    assert int(coarse_mask.sum()) == 4 * 8 and int(middle_mask[0].sum()) == math.ceil(0.6 * 64)
    hidden_octants = choices["octants"][0].flatten().nonzero().flatten().tolist()
    for j, octant in enumerate(hidden_octants):
        a, b, c = (octant >> 2) & 1, (octant >> 1) & 1, octant & 1
        region = (slice(32 * a, 32 * a + 32), slice(32 * b, 32 * b + 32), slice(32 * c, 32 * c + 32))
        assert torch.equal(middle[j, 0], ct_crop[(0, 0, *region)])  # the octant at native resolution …
        half = tuple(slice(s.start // 2, s.stop // 2) for s in region)
        # … and, averaged 2×, the coarse level there
        assert torch.allclose(F.avg_pool3d(middle[j:j + 1], 2)[0, 0], coarse[(0, 0, *half)], atol=1e-6)
        tokens = tuple(slice(s.start // 8, s.stop // 8) for s in half)
        assert coarse_mask[(0, *tokens)].all()  # and hidden there
    for index, token in enumerate(choices["fine_tokens"].flatten().tolist()):
        parent = index // 2
        assert middle_mask[parent].flatten()[token]  # a patch hidden at the middle level …
        z, y, x = token // 16, token // 4 % 4, token % 4
        patch = middle[parent:parent + 1, :, 8 * z:8 * z + 8, 8 * y:8 * y + 8, 8 * x:8 * x + 8]
        upsampled = F.interpolate(patch, size=(32, 32, 32), mode="trilinear", align_corners=False)
        assert torch.allclose(fine[index], upsampled[0], atol=1e-6)  # … upsampled to the volume size
    assert int(fine_mask[0].sum()) == 32


def test_the_coarse_feature_enters_the_coarse_middle_alignment():
    mim = tiny_method("mim")
    choices = mim.sample(1, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(0)
    decoded = {"coarse": torch.randn(1, 4, 32, 32, 32, generator=generator),
               "middle": torch.randn(4, 4, 32, 32, 32, generator=generator),
               "fine": torch.randn(8, 4, 32, 32, 32, generator=generator)}
    reference = mim.alignment(decoded, choices["octants"], choices["fine_tokens"])
    octants = choices["octants"][0].flatten()
    for octant, hidden in [(int(octants.nonzero()[0]), True), (int((~octants).nonzero()[0]), False)]:
        a, b, c = (octant >> 2) & 1, (octant >> 1) & 1, octant & 1
        changed = {**decoded, "coarse": decoded["coarse"].clone()}
        changed["coarse"][:, :, 16 * a:16 * a + 16, 16 * b:16 * b + 16, 16 * c:16 * c + 16] += 3.0
        terms = mim.alignment(changed, choices["octants"], choices["fine_tokens"])
        moved = not torch.isclose(terms["align_coarse_middle"], reference["align_coarse_middle"])
        assert moved == hidden, (octant, hidden)  # only the octants the middle level came from count
        assert torch.equal(terms["align_middle_fine"], reference["align_middle_fine"])


def test_hidden_voxels_reach_no_feature_of_the_encoder(ct_crop):
    network = build_network({"name": "hybrid", "in_channels": 1, "out_channels": 1, **TINY_NETWORK}).eval()
    mask = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    voxels = mask.repeat_interleave(8, 1).repeat_interleave(8, 2).repeat_interleave(8, 3)[:, None]
    image = ct_crop[..., :32, :32, :32]
    other = torch.where(voxels, torch.rand_like(image), image)
    with torch.no_grad():
        first, second = hidden_pass(network, image, mask), hidden_pass(network, other, mask)
        shown = hidden_pass(network, other, None)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.allclose(first[0], shown[0])  # without the mask, the same voxels do count


def test_denormalise_inverts_the_normalised_target(ct_crop):
    image = ct_crop[..., :32, :32, :32]
    patches = patchify(image, 8)
    normalised = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    prediction = unpatchify(normalised, 8, (4, 4, 4), 1)
    assert torch.allclose(token_losses(prediction, image, 8), torch.zeros(1, 64), atol=1e-8)
    assert torch.allclose(denormalise(prediction, image, 8), image, atol=1e-5)


def test_hard_patch_mask_counts_and_hardest_share_follow_the_schedule():
    hpm = tiny_method("hpm")  # 4³ = 64 tokens, 48 hidden
    assert hpm.masked == 48
    steps = 8
    predicted = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        choices = hpm.sample(3, torch.Generator().manual_seed(step), progress=(step + 1) / steps)
        assert choices["hard"] == int(0.5 * (step + 1) / steps * 48)  # α = 0.5·(epoch + 1)/T
        mask = hard_patch_mask(predicted, choices["noise"], hpm.masked, choices["hard"])
        assert mask.sum(1).tolist() == [48, 48, 48]
        hardest = predicted.topk(choices["hard"], dim=1).indices
        assert mask.gather(1, hardest).all()
    # With no hard share the mask is the noise's alone; with all of it, exactly the predicted hardest.
    noise = torch.rand(3, 64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(hard_patch_mask(predicted, noise, 48, 0), hard_patch_mask(-predicted, noise, 48, 0))
    everything = hard_patch_mask(predicted, noise, 48, 48)
    assert torch.equal(everything, predicted >= predicted.topk(48, dim=1).values[:, -1:])


def test_ranking_loss_by_hand():
    log_sigmoid = lambda v: math.log(1 / (1 + math.exp(-v)))  # noqa: E731
    both = torch.tensor([[True, True]])
    # p = (0, 1), t = (0, 1): σ(1) against 1 for the pair (0, 1), σ(−1) against 0 for (1, 0).
    rising = torch.tensor([[0.0, 1.0]])
    assert float(ranking_loss(rising, rising, both)) == pytest.approx(-log_sigmoid(1))
    # Ties rank nothing above: σ(0) against 0 both ways.
    tied = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert float(ranking_loss(*tied, both)) == pytest.approx(math.log(2))
    # An unscored token (the third) takes part in no pair; the predictions rank the other two the wrong way.
    scored = torch.tensor([[True, True, False]])
    loss = ranking_loss(torch.tensor([[2.0, 0.0, 5.0]]), torch.tensor([[0.0, 1.0, 9.0]]), scored)
    assert float(loss) == pytest.approx(-log_sigmoid(-2))


def test_ema_teacher_follows_the_student_on_its_schedule():
    hpm = tiny_method("hpm")
    assert hpm.ema_decay_at(0, 100) == pytest.approx(0.999)
    assert hpm.ema_decay_at(25, 100) == pytest.approx(0.99945)  # half-way through the ramp (half the run)
    assert hpm.ema_decay_at(50, 100) == pytest.approx(0.9999) and hpm.ema_decay_at(90, 100) == pytest.approx(0.9999)
    teacher_before = {k: v.clone() for k, v in hpm.teacher.state_dict().items()}
    with torch.no_grad():
        for parameter in [*hpm.network.parameters(), *hpm.loss_predictor.parameters()]:
            parameter.add_(torch.randn_like(parameter))
    student = {**{f"network.{k}": v for k, v in hpm.network.state_dict().items()},
               **{f"loss_predictor.{k}": v for k, v in hpm.loss_predictor.state_dict().items()}}
    hpm.after_step(25, 100)
    for name, value in hpm.teacher.state_dict().items():
        expected = 0.99945 * teacher_before[name] + 0.00055 * student[name]
        assert torch.allclose(value, expected, atol=1e-6), name
    assert not any(p.requires_grad for p in hpm.teacher.parameters())


@pytest.mark.parametrize("bfloat16", [False, True])
@pytest.mark.parametrize("method", ["mim", "hpm"])
def test_every_trainable_parameter_gets_a_finite_gradient(ct_crop, method, bfloat16):
    """What DDP needs: a parameter that never gets a gradient stalls every multi-GPU run. Also under
    bfloat16 autocast, the GPU recipes' setting: the CPU's autocast finds dtype clashes without a GPU."""
    model = tiny_method(method)
    image = ct_crop if method == "mim" else ct_crop[..., :32, :32, :32]
    batch = 1 if bfloat16 else 2  # bfloat16 is emulated, and slow, on CPUs without it
    image = image.expand(batch, -1, -1, -1, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        loss, _ = model(image, torch.ones_like(image), **model.sample(batch, torch.Generator().manual_seed(0)))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()] == []


def test_mim_recompute_gives_the_same_loss_and_gradients(ct_crop):
    results = []
    for recompute in (0, 3):  # 3: chunks of 3, 3 and 1 fine volumes, of 3 and 1 middle ones
        torch.manual_seed(0)
        model = build_method(merge_recipes(tiny_recipe("mim"), {"mim": {"recompute": recompute}}), 1)
        loss, _ = model(ct_crop, torch.ones_like(ct_crop), **model.sample(1, torch.Generator().manual_seed(2)))
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert torch.allclose(plain, recomputed, atol=1e-6) and plain_grads.keys() == recomputed_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, recomputed_grads[name], atol=1e-5, rtol=1e-4), name


def _tiny_step_memory(method: str) -> tuple[int, int]:
    """(bytes a tiny recipe's step holds whatever it does, bytes a volume's activations add), as stepmemory judges:
    the MiM step's 13 volumes (1 coarse, 4 octants, 2 patches of each) keep their inputs, outputs and features."""
    model, recipe = tiny_method(method), tiny_recipe(method)
    per_volume = crop_bytes(recipe["network"], (32, 32, 32))
    learnt = sum(p.numel() for p in model.parameters() if p.requires_grad)
    held = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    fixed = RESERVE_BYTES + BYTES_PER_PARAMETER * learnt + 4 * held
    if method == "mim":
        assert volumes_per_crop(model) == 13
        fixed += 13 * KEPT_BYTES * (4 + 2) * 32 ** 3
    return fixed, per_volume


@pytest.mark.parametrize("method, warned, refused", [
    ("mim", "MiM's 13 volumes of 32×32×32 a step would need about", "MiM's 13 volumes of 32×32×32 a step need about"),
    ("hpm", "the 4 crops of 32×32×32 of a step may need up to about", "a pre-training crop of 32×32×32 voxels needs")])
def test_a_cpu_short_of_memory_for_a_step_is_met_before_the_first(prepared, tmp_path, monkeypatch, method, warned,
                                                                   refused):
    """With room for 2.5 volumes, MiM keeps 2 at a time and recomputes them (the same loss and gradients: the
    recompute test above; its packaged step, 42 volumes of 96³, would need about 56 GiB), SelfMedHPM (whose step
    cannot be split) is warned of; with room for half of one, both are refused, nothing written."""
    recipe = tiny_recipe(method, steps=1)
    data = load_prepared(prepared, Preprocessing.from_dict(recipe["preprocessing"]), Reporter("quiet"))
    fixed, per_volume = _tiny_step_memory(method)
    monkeypatch.setattr(trainer_module, "available_bytes", lambda: fixed + int(2.5 * per_volume))
    reporter = WarningsKept()
    assert pretrain(recipe, data, tmp_path / "short.safetensors", reporter, device="cpu")["step"] == 1
    assert [w for w in reporter.warnings if w.startswith(warned)], reporter.warnings
    if method == "mim":
        assert "kept 2 at a time and recomputed" in reporter.warnings[-1]
    monkeypatch.setattr(trainer_module, "available_bytes", lambda: fixed + per_volume // 2)
    with pytest.raises(UserError, match=refused):
        pretrain(recipe, data, tmp_path / "none.safetensors", Reporter("quiet"), device="cpu")
    assert not (tmp_path / "none.safetensors").exists()


def _out_of_gpu_memory_beyond(volumes: int):
    """``build_method``, with the real network raising the error CUDA raises when its memory runs out on more than
    ``volumes`` volumes at once (fault injection: no GPU here)."""
    def build(recipe: dict, channels: int) -> torch.nn.Module:
        method = build_method(recipe, channels)
        encode = method.network.encode

        def limited(image, **kwargs):
            if image.shape[0] > volumes:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return encode(image, **kwargs)

        method.network.encode = limited
        return method
    return build


def test_a_mim_step_out_of_gpu_memory_runs_again_keeping_fewer_volumes(prepared, tmp_path, monkeypatch):
    """A MiM step (13 volumes a crop) that runs out of GPU memory on more than 2 volumes at once runs again keeping
    6, 3, then 1 volume's activations at a time, with the loss of a run that never ran out, and the next steps
    keep 1; where even one volume runs out, a one-line refusal and nothing written."""
    recipe = tiny_recipe("mim", steps=2, log_every=1)
    data = load_prepared(prepared, Preprocessing.from_dict(recipe["preprocessing"]), Reporter("quiet"))
    runs = {}
    for name, limit in (("plain", 13), ("short", 2)):
        monkeypatch.setattr(trainer_module, "build_method", _out_of_gpu_memory_beyond(limit))
        stream = io.StringIO()
        pretrain(recipe, data, tmp_path / f"{name}.safetensors", Reporter("json", stream), device="cpu")
        runs[name] = [e for e in map(parse_event, stream.getvalue().splitlines()) if e]
    assert not [e for e in runs["plain"] if e.get("level") == "warning"]
    assert [e["text"] for e in runs["short"] if e.get("level") == "warning"] == [
        f"out of GPU memory with {kept} volumes' activations kept at a time: the steps go on with {kept // 2}"
        for kept in (13, 6, 3)]
    plain, short = ([e for e in run if e["event"] == "metric"] for run in (runs["plain"], runs["short"]))
    assert [m["step"] for m in short] == [1, 2]
    for expected, measured in zip(plain, short):
        for term in ("loss", "coarse", "middle", "fine", "align_coarse_middle", "align_middle_fine"):
            assert measured[term] == pytest.approx(expected[term], rel=1e-4, abs=1e-6), (measured["step"], term)
    monkeypatch.setattr(trainer_module, "build_method", _out_of_gpu_memory_beyond(0))
    with pytest.raises(UserError, match=r"^out of GPU memory with one MiM volume of 32×32×32 at a time: pre-train "
                                        r"on fewer crops a step"):
        pretrain(recipe, data, tmp_path / "none.safetensors", Reporter("quiet"), device="cpu")
    assert not (tmp_path / "none.safetensors").exists()


def test_a_mim_step_that_fits_the_gpu_keeps_the_recipes_recompute():
    """Not 0 (all activations kept) for a recompute larger than the step's 13 volumes: each level then is one chunk
    recomputed, the least memory."""
    seen = []
    for recompute in (0, 3, 50):
        method = build_method(merge_recipes(tiny_recipe("mim"), {"mim": {"recompute": recompute}}), 1)
        mim_step_within_gpu_memory(lambda: seen.append(method.recompute), method, 1, lambda: None, Reporter("quiet"))
    assert seen == [0, 3, 50]

    # where that runs out, the halving starts from the step's 13 volumes, not from 50 (25 would be one chunk again)
    def out_of_memory_once():
        seen.append(method.recompute)
        if len(seen) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    seen, reporter = [], WarningsKept()
    mim_step_within_gpu_memory(out_of_memory_once, method, 1, lambda: None, reporter)
    assert seen == [50, 6] and reporter.warnings == [
        "out of GPU memory with 13 volumes' activations kept at a time: the steps go on with 6"]


def test_hybridmim_s_unet_is_judged_by_the_block_it_decodes():
    """The packaged HybridMIM U-Net step (2 crops of 96³, decoding a 64³ block) measured 3.5 GiB on top of what the
    process held before it (lung_tumor_ct, 3 steps); judged as decoding whole crops it would be warned of at 4.5 GiB
    free, as it is when its recipe does decode the whole crop."""
    recipe = load_recipe("hybridmim", "cnn", None)
    method = build_method(recipe, 1)
    for regions, warned in ((2, False), (3, True)):
        method.decoder_regions, reporter = regions, WarningsKept()
        fit_cpu_memory(method, recipe["network"], 1, recipe["train"]["crops_per_volume"], int(4.5 * GIB), reporter)
        assert bool(reporter.warnings) == warned, (regions, reporter.warnings)


# --- training on real crops -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory) -> dict:
    """Each method trained a few steps (MiM 20, SelfMedHPM 30) on the real crops, with its events."""
    runs = {}
    for method, steps in (("mim", 20), ("hpm", 30)):
        recipe = tiny_recipe(method, steps=steps, log_every=10, checkpoint_every=steps, num_threads=None)
        data = load_prepared(prepared, Preprocessing.from_dict(recipe["preprocessing"]), Reporter("quiet"))
        output = tmp_path_factory.mktemp(method) / f"{method}.safetensors"
        stream = io.StringIO()
        pretrain(recipe, data, output, Reporter("json", stream), device="cpu")
        runs[method] = {"recipe": recipe, "data": data, "output": output,
                        "events": [e for e in map(parse_event, stream.getvalue().splitlines()) if e]}
    return runs


@pytest.mark.parametrize("method, terms", [("mim", ["coarse", "middle", "fine", "align_coarse_middle",
                                                    "align_middle_fine"]),
                                           ("hpm", ["reconstruction", "ranking", "hard_share"])])
def test_a_few_steps_on_real_ct_crops_lower_the_loss(trained, method, terms):
    run = trained[method]
    metrics = [e for e in run["events"] if e["event"] == "metric"]
    assert set(metrics[-1]) >= {"loss", *terms}
    before = terms_on_fixed_batches(tiny_method(method), run["data"], 1234, volumes=2, crops=1)
    after_method = tiny_method(method)
    after_method.load_state_dict(runstate.load_resume_state(run["output"], "pretrain")["method"])
    after = terms_on_fixed_batches(after_method, run["data"], 1234, volumes=2, crops=1)
    assert all(a["loss"] < b["loss"] for a, b in zip(after, before)), (before, after)
    reconstruction = ["coarse", "middle", "fine"] if method == "mim" else ["reconstruction"]
    for name in reconstruction:
        assert mean_term(after, name) < mean_term(before, name) - 0.02, (name, before, after)
    # Below 1: better than predicting each patch's own mean, which scores exactly 1 (measured 0.985–0.99).
    assert np.mean([mean_term(after, name) for name in reconstruction]) < 1.0, after
    if method == "mim":
        assert mean_term(after, "align_coarse_middle") < 0.5 * mean_term(before, "align_coarse_middle")

    from hybridmim.checkpoint import read_metadata
    meta = read_metadata(run["output"])
    assert meta.method == method and meta.pretraining["masking"] == "tokens"
    assert meta.roi_size == (32, 32, 32) and meta.network["name"] == "hybrid"


@pytest.mark.parametrize("method", ["mim", "hpm"])
def test_stop_then_resume_ends_exactly_like_an_uninterrupted_run(prepared, method, tmp_path):
    recipe = tiny_recipe(method)
    data = load_prepared(prepared, Preprocessing.from_dict(recipe["preprocessing"]), Reporter("quiet"))
    whole = tmp_path / "whole.safetensors"
    pretrain(recipe, data, whole, Reporter("quiet"), device="cpu")

    parts = tmp_path / "parts.safetensors"
    outputs = pretrain(recipe, data, parts, Reporter("json", StopsAt("pre-train", 3)), device="cpu")
    assert outputs["step"] == 3
    state = runstate.load_resume_state(parts, "pretrain")
    pretrain(state["recipe"], data, parts, Reporter("quiet"), state=state, device="cpu")
    first, second = load_file(str(whole)), load_file(str(parts))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # The teacher (SelfMedHPM) and every head resume too, not only the network a checkpoint keeps.
    whole_state, parts_state = (runstate.load_resume_state(p, "pretrain")["method"] for p in (whole, parts))
    assert all(torch.equal(whole_state[k], parts_state[k]) for k in whole_state)


@pytest.mark.parametrize("method", ["mim", "hpm"])
def test_finetune_starts_from_the_checkpoint_with_encoder_and_decoder(trained, method):
    from hybridmim.training.finetune import load_recipe as finetune_recipe

    checkpoint = trained[method]["output"]
    labels = str(Path(__file__).parents[1] / "scripts/labels/sarcoma.json")
    start = resolve_start(str(checkpoint), finetune_recipe(None), labels, Reporter("quiet"))
    assert start.init["pretraining"]["method"] == method and start.roi_size == (32, 32, 32)
    network = build_network(start.network)
    summary = transfer_weights(network, start.weights, None)
    assert summary["new"] == ["head.bias", "head.weight"]
    loaded, pretrained = network.state_dict(), load_file(str(checkpoint))
    for name in pretrained:
        if not name.startswith("head."):
            assert torch.equal(loaded[name], pretrained[name].float()), name
    transferred = {"blocks.0.attn.qkv.weight", "embed.weight", "ups.0.up.deconv.weight", "stem.0.conv.weight"}
    assert transferred <= set(pretrained)


def test_a_selfmedhpm_model_fine_tunes_and_segments_end_to_end(trained, tmp_path):
    """The hybrid network's path through the commands: fine-tuned from the pre-trained checkpoint, then segmenting."""
    around_the_tumour(data_file("sarcoma_ct/STS_036"), tmp_path / "cases" / "STS_036")
    (tmp_path / "short.json").write_text(json.dumps({"train": {
        "epochs": 1, "steps_per_epoch": 2, "volumes_per_step": 1, "crops_per_volume": 1, "amp": "none"}}))
    output = tmp_path / "tumour.safetensors"
    run_cli_here("finetune", "--init", trained["hpm"]["output"], "--data", tmp_path / "cases", "--val-fraction", "0",
                 "--labels", REPO / "scripts/labels/sarcoma.json", "--recipe", tmp_path / "short.json", "--cache",
                 tmp_path / "cache", "-o", output, "--device", "cpu", check_rc=0)
    seg = tmp_path / "sts036.nii.gz"
    run_cli_here("segment", tmp_path / "cases" / "STS_036" / "image.nii.gz", "-o", seg, "--model", output,
                 "--device", "cpu", check_rc=0)
    assert sitk.ReadImage(str(seg)).GetSize() == sitk.ReadImage(str(tmp_path / "cases/STS_036/image.nii.gz")).GetSize()


def test_reconstruct_shows_a_token_masked_model(trained, scans, tmp_path):
    output = tmp_path / "recon"
    result = run_cli_here("reconstruct", scans / "abdomen.nii.gz", "-o", output, "--model", trained["hpm"]["output"],
                          "--device", "cpu", "--progress", "json", check_rc=0)
    done = [e for e in map(parse_event, result.stdout.splitlines()) if e and e["event"] == "done"][0]["outputs"]
    assert done["patch_mean_and_spread_from_truth"] is True and done["mask_ratio"] == 0.75
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(scans / "abdomen.nii.gz"))).astype(np.float32)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "mask.nii.gz"))).astype(bool)
    rebuilt = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "reconstruction.nii.gz")))
    assert 0.6 < mask.mean() < 0.9 and np.array_equal(rebuilt[~mask], original[~mask])
    assert np.isfinite(rebuilt).all() and 0 < done["mae_model"] < 1000
    assert json.loads(json.dumps(done))  # the summary is plain JSON


def test_every_packaged_and_script_recipe_builds_and_a_wrong_backbone_is_refused(tmp_path, refused):
    from hybridmim.pretraining.trainer import check_recipe

    repo = Path(__file__).parents[1]
    packaged = sorted((repo / "HybridMIMSegment/Resources/Recipes").glob("pretrain-*.json"))
    scripts = sorted((repo / "scripts/recipes").glob("*pretrain-*.json"))
    assert {p.stem for p in packaged} >= {"pretrain-mim-hybrid", "pretrain-hpm-hybrid"} and len(scripts) >= 2
    for path in packaged + scripts:
        recipe = load_recipe(None, None, str(path))
        check_recipe(recipe)
        assert recipe["method"] in path.stem
    assert load_recipe("mim", None, None)["network"]["name"] == "hybrid"  # MiM's own default backbone
    from hybridmim.training.finetune import load_recipe as finetune_recipe
    scratch_networks = {}
    for path in sorted((repo / "scripts/recipes").glob("label-efficiency-*.json")):  # the study's scratch arms
        start = resolve_start("scratch", finetune_recipe(str(path)), None, Reporter("quiet"))
        build_network(start.network)
        scratch_networks[path.stem] = start.network["name"]
    assert scratch_networks == {"label-efficiency-sarcoma": "unet", "label-efficiency-sarcoma-hybrid": "hybrid"}
    refused("pretrain", "--method", "mim", "--backbone", "cnn", "--data", tmp_path, "-o", tmp_path / "x.safetensors",
            message="error: no mim recipe for the cnn backbone (packaged: hybrid)")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "hpm", "hpm": {"ema_decay": [0.999]}}), encoding="utf-8")
    refused("pretrain", "--recipe", bad, "--data", tmp_path, "-o", tmp_path / "x.safetensors",
            message="error: SelfMedHPM: ema_decay must be [start, end], each in [0, 1), got [0.999]")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_model_finetuned_from_selfmedhpm_trains_and_segments(trained, tmp_path):
    from hybridmim.checkpoint import read_metadata
    from hybridmim.training.finetune import run_finetune

    for split, number in (("train", 1), ("train", 2), ("val", 36)):
        (tmp_path / split).mkdir(exist_ok=True)
        (tmp_path / split / f"STS_{number:03d}").symlink_to(data_file(f"sarcoma_ct/STS_{number:03d}"))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"labels": [{"value": 1, "name": "soft-tissue sarcoma", "color": [230, 60, 60]}],
                                  "train": {"epochs": 1, "steps_per_epoch": 3, "volumes_per_step": 2, "lr": 1e-3,
                                            "warmup_steps": 1, "amp": "none", "half_precision": False}}))
    output = tmp_path / "sts.safetensors"
    outputs = run_finetune(str(trained["hpm"]["output"]), [str(tmp_path / "train")], str(output), Reporter("quiet"),
                           val_paths=[str(tmp_path / "val")], recipe_file=str(recipe), cache=str(tmp_path / "cache"),
                           device="cpu")
    meta = read_metadata(output)
    assert meta.task == "segmentation" and "hpm pre-training" in meta.method and meta.network["name"] == "hybrid"
    assert 0.0 <= outputs["best_dice"] <= 1.0
    segmentation = tmp_path / "sts036.nii.gz"
    image = tmp_path / "val" / "STS_036" / "image.nii.gz"
    run_cli_here("segment", image, "-o", segmentation, "--model", output, "--device", "cpu", check_rc=0)
    result, source = sitk.ReadImage(str(segmentation)), sitk.ReadImage(str(image))
    assert result.GetSize() == source.GetSize() and result.GetOrigin() == source.GetOrigin()
    assert set(np.unique(sitk.GetArrayViewFromImage(result))) <= {0, 1}


def test_self_pre_training_reads_the_fine_tuning_tasks_prepared_training_cases(tmp_path):
    """The GPU plan's self pre-training (scripts/device_methods.sh) starts from the sarcoma folder prepared for
    fine-tuning: same pre-processing as the self pre-training recipes, labels carried but unused."""
    from hybridmim.checkpoint import read_metadata
    from hybridmim.training.finetune import load_recipe as finetune_recipe

    sarcoma_recipe = finetune_recipe(str(REPO / "scripts/recipes/finetune-sarcoma-ct.json"))
    shipped_start = resolve_start("ct-hybridmim-cnn", sarcoma_recipe, None, Reporter("quiet"))
    for method in ("mim", "hpm"):
        recipe = load_recipe(None, None, str(REPO / f"scripts/recipes/self-pretrain-{method}-sarcoma.json"))
        assert Preprocessing.from_dict(recipe["preprocessing"]) == shipped_start.preprocessing, method

    for number in (1, 2):
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / f"STS_{number:03d}").symlink_to(data_file(f"sarcoma_ct/STS_{number:03d}"))
    pretrain_recipe = {"method": "hpm", **tiny_recipe("hpm", steps=2, checkpoint_every=2)}
    (tmp_path / "hpm.json").write_text(json.dumps(pretrain_recipe), encoding="utf-8")
    (tmp_path / "finetune.json").write_text(json.dumps({
        "labels": [{"value": 1, "name": "soft-tissue sarcoma", "color": [230, 60, 60]}],
        "scratch": {"preprocessing": pretrain_recipe["preprocessing"]}}), encoding="utf-8")
    cache = tmp_path / "sarcoma-train"
    run_cli_here("finetune", "--init", "scratch", "--recipe", tmp_path / "finetune.json", "--data", tmp_path / "train",
                 "--cache", cache, "--prepare-only", check_rc=0)
    output = tmp_path / "sts-hpm.safetensors"
    run_cli_here("pretrain", "--recipe", tmp_path / "hpm.json", "--data", cache, "-o", output, "--device", "cpu",
                 check_rc=0)
    meta = read_metadata(output)
    assert meta.task == "reconstruction" and meta.method == "hpm" and meta.provenance["steps"] == 2
    assert sorted(d["name"] for d in meta.provenance["data"]) == ["STS_001", "STS_002"]


def test_two_process_gloo_run_of_selfmedhpm_completes(prepared, tmp_path):
    recipe = tmp_path / "hpm.json"
    recipe.write_text(json.dumps({"method": "hpm", **TINY["hpm"]}), encoding="utf-8")
    output = tmp_path / "ddp.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "hybridmim", "pretrain", "--recipe", str(recipe), "--data", str(prepared), "-o", str(output),
         "--steps", "3", "--device", "cpu", "--progress", "quiet"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert runstate.load_resume_state(output, "pretrain")["step"] == 3
