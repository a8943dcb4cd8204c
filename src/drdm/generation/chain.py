"""The recovery chain of generation (method §5), pure torch (no Lightning, Hydra or files).

Starting from a diffused field ``u`` (the original image deformed to step ``t0``), the network is
asked at steps ``i = start, start-1, ..., 0`` for the recovery displacement ``p_i`` of the current
image; ``u <- compose(u, p_i)`` (``p_i + u o (id + p_i)``) and the current image is re-made by
warping the **original** with ``u`` (never the previous warped image: blur would accumulate).

The reference runs the chain from ``T - 1`` whatever ``t0`` is (``DRDM_augment.py`` /
``diff_recover``); the authors' checkpoint was tuned for that, so it is our default. Starting
at ``t0 - 1`` instead (``start_step="t0"``) recovers less and stays closer to the diffused image.

**Few-step chains** (:func:`step_plan`). With ``sampling_steps = C`` the steps ``start .. 0`` are
cut into ``C`` consecutive blocks; the network is called once per block, at its first (highest)
step, and its prediction stands in for the steps it skips. How it stands in is ``skipped_steps``:

* ``"once"``: applied once; the chain simply visits fewer steps. In the authors' chain,
  consecutive predictions in the middle of the chain were nearly uncorrelated in a one-off probe
  on an ACDC slice (steps ~70 to ~20), while the field's size barely changed: the steps mostly
  cancel, so applying one prediction for many steps adds drift the chain never makes (the
  ``repeat`` rows of ``experiments/benchmarks/results/generation.md`` show it);
* ``"repeat"``: the prediction is applied once per step of its block, ``p^r`` (the ``r``-fold
  self-composition, exact by binary powers, :func:`drdm.deform.flow.integrate`): what the full chain
  would do if the network's answer did not change over the block;
* ``"k_rec"``: the prediction is rescaled to the recovery the network was trained to give over the
  block: at step ``j`` the training target is ``k_rec(j)`` compositions of the clean velocity, so
  the block's power is ``sum_j k_rec(j) / k_rec(i)`` (fractional powers: the integer part by
  composition, the rest as a linearly scaled displacement). ``k_rec`` falls towards 0, so this
  applies less than ``"repeat"`` in the last blocks;
* ``"remaining"``: the chain read as the network's training task: at step ``j`` it is shown an
  image deformed by ``k_diff(j)`` compositions and asked to undo ``k_rec(j)`` of them, i.e. the
  share ``r_j = k_rec(j) / k_diff(j)`` of the deformation left. A block then removes
  ``1 - prod_j (1 - r_j)`` of it (shares of what is left compound, they do not add), so the call's
  prediction (share ``r_i``) is raised to ``(1 - prod_j (1 - r_j)) / r_i``. This saturates where
  the others overshoot: ``r_1 = 1``, and the last block never removes more than all that is left;
* ``"uncorrelated"``: the prediction is rescaled to the size of the block's steps added as
  uncorrelated vectors, ``sqrt(sum_j k_rec(j)^2) / k_rec(i)``: the random-walk reading of the
  probe above (steps of size ``~k_rec(j)`` in nearly unrelated directions add in quadrature, so
  ``r`` such steps move the field ``~sqrt(r)`` steps' length, not ``r``). It applies more than
  ``"once"`` and less than ``"k_rec"``.

With one call per step every rule is the full chain, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from drdm.deform.flow import integrate
from drdm.deform.spatial import compose, warp

SKIPPED_STEP_RULES = ("once", "repeat", "k_rec", "remaining", "uncorrelated")


def minmax_normalise(image: torch.Tensor) -> torch.Tensor:
    """Scale each sample of ``[B, C, *S]`` to ``0..1`` (the range the networks are trained on)."""
    flat = image.flatten(1)
    low = flat.min(1).values.view(-1, *([1] * (image.ndim - 1)))
    high = flat.max(1).values.view(-1, *([1] * (image.ndim - 1)))
    return (image - low) / (high - low).clamp_min(1e-8)


def start_steps(t0: torch.Tensor, timesteps: int, start_step: str | int = "T") -> torch.Tensor:
    """First network step per sample, ``[B]`` long: ``T-1`` ("T"), ``t0-1`` ("t0") or an int."""
    if start_step == "T":
        return torch.full_like(t0, timesteps - 1)
    if start_step == "t0":
        return (t0 - 1).clamp(min=0)
    if isinstance(start_step, int) and 0 <= start_step < timesteps:
        return torch.full_like(t0, start_step)
    raise ValueError(
        f"start_step must be 'T', 't0' or an int in [0, {timesteps}), got {start_step!r}"
    )


def check_sampling_steps(sampling_steps: int | None, skipped_steps: str = "once") -> None:
    """Raise a clear ``ValueError`` for a bad ``sampling_steps`` / ``skipped_steps`` option."""
    if sampling_steps is not None and (
        isinstance(sampling_steps, bool)
        or not isinstance(sampling_steps, int)
        or sampling_steps < 1
    ):
        raise ValueError(
            f"sampling_steps must be an int >= 1 (network calls per sample) or None (one call "
            f"per step), got {sampling_steps!r}"
        )
    if skipped_steps not in SKIPPED_STEP_RULES:
        raise ValueError(
            f"skipped_steps must be one of {' | '.join(SKIPPED_STEP_RULES)}, got {skipped_steps!r}"
        )


@dataclass
class StepPlan:
    """Network calls of a batch's recovery chains, call ``c = 0 .. C-1`` in order.

    steps ``[C, B]`` long: the step ``t`` each sample is asked at; power ``[C, B]`` float: how many
    steps the call's prediction stands for (1 in a full chain); active ``[C, B]`` bool: chains
    shorter than the longest wait (keep ``u``) until their first call. All chains end at step 0.
    """

    steps: torch.Tensor
    power: torch.Tensor
    active: torch.Tensor
    single: list[bool]  # per call: every power is 1 (known on the host, no device sync)

    @property
    def calls(self) -> int:
        return int(self.steps.shape[0])


def block_starts(first_step: int, sampling_steps: int | None) -> list[int]:
    """The called steps of one chain ``first_step .. 0``: the top of each of ``C`` near-equal
    consecutive blocks (``C = min(sampling_steps, first_step + 1)``; ``None``: every step)."""
    length = first_step + 1
    calls = length if sampling_steps is None else min(int(sampling_steps), length)
    return [first_step - (c * length) // calls for c in range(calls)]


def block_powers(first: int, starts: list[int], rule: str, deformation=None) -> list[float]:
    """How many steps each call of one chain ``first .. 0`` stands for (``rule``: module docs)."""
    ends = [*starts[1:], -1]  # each block runs from its start down to the next start + 1
    if rule == "once":
        return [1.0] * len(starts)
    if rule == "repeat":
        return [float(start - end) for start, end in zip(starts, ends)]
    if deformation is None:
        raise ValueError(f"skipped_steps={rule!r} needs the forward process (k_rec, k_diff)")
    t = torch.arange(first + 1)
    k_rec = deformation.recovery_steps(t).double()
    if rule in ("k_rec", "uncorrelated"):
        shares = k_rec
    else:  # remaining: step j removes the share r_j = k_rec(j) / k_diff(j) of what is left
        shares = (k_rec / deformation.diffusion_steps(t).double().clamp_min(1)).clamp(max=1)
    powers = []
    for start, end in zip(starts, ends):
        block, top = shares[end + 1 : start + 1], float(shares[start])
        if start - end == 1 or top <= 0:
            powers.append(1.0)
        elif rule == "k_rec":
            powers.append(float(block.sum()) / top)
        elif rule == "uncorrelated":
            powers.append(float(block.square().sum().sqrt()) / top)
        else:
            powers.append(float(1 - torch.prod(1 - block)) / top)
    return powers


def step_plan(
    first_step: torch.Tensor,
    sampling_steps: int | None = None,
    skipped_steps: str = "once",
    deformation=None,
) -> StepPlan:
    """The calls of each chain ``first_step[b] .. 0`` (see the module docstring).

    Args:
        first_step: ``[B]`` long, the first step of each chain.
        sampling_steps: network calls per chain (``None``: one per step, the method's chain).
        skipped_steps: ``"once"``, ``"repeat"``, ``"k_rec"``, ``"remaining"`` or
            ``"uncorrelated"`` (the last three need ``deformation``).
        deformation: the forward process, with ``recovery_steps`` (``k_rec``) and
            ``diffusion_steps`` (``k_diff``), ``t [B] long -> [B] long`` (``RandomDeformation``).
    """
    check_sampling_steps(sampling_steps, skipped_steps)
    chains = []
    for first in first_step.tolist():
        if first < 0:
            raise ValueError(f"first steps must be >= 0, got {first}")
        starts = block_starts(int(first), sampling_steps)
        chains.append((starts, block_powers(int(first), starts, skipped_steps, deformation)))
    calls = max(len(starts) for starts, _ in chains)
    steps = torch.zeros(calls, len(chains), dtype=torch.long)
    power = torch.ones(calls, len(chains))
    active = torch.zeros(calls, len(chains), dtype=torch.bool)
    for b, (starts, powers) in enumerate(chains):
        wait = calls - len(starts)
        steps[:wait, b] = starts[0]  # a valid t for the calls whose output is discarded
        steps[wait:, b] = torch.tensor(starts)
        power[wait:, b] = torch.tensor(powers)
        active[wait:, b] = True
    device = first_step.device
    single = [bool((row == 1).all()) for row in power]
    return StepPlan(steps.to(device), power.to(device), active.to(device), single)


def displacement_power(displacement: torch.Tensor, power: torch.Tensor) -> torch.Tensor:
    """The map ``x -> x + displacement(x)`` applied ``power[b]`` times, ``[B, ndims, *S]`` voxels.

    ``power`` ``[B]`` float ``>= 0``: the integer part by exact self-composition (binary powers),
    the fractional part ``f`` as the scaled displacement ``f * displacement`` (first order in the
    displacement, so continuous in ``power``). A power of 1 returns ``displacement`` itself.
    """
    whole = torch.floor(power)
    fraction = power - whole
    result = integrate(displacement, whole.long())
    if bool((fraction > 0).any()):
        scale = fraction.to(displacement.dtype).view(-1, *([1] * (displacement.ndim - 1)))
        result = compose(result, scale * displacement)
    return result


@torch.no_grad()
def recover(
    net: torch.nn.Module,
    image: torch.Tensor,
    diffused: torch.Tensor,
    first_step: torch.Tensor,
    mode: str = "bilinear",
    sampling_steps: int | None = None,
    skipped_steps: str = "once",
    deformation=None,
    compose_padding: str = "border",
) -> torch.Tensor:
    """Run the recovery chain and return the final field ``[B, ndims, *S]`` (voxels).

    Args:
        net: ``net(image [B, 1, *S], t [B]) -> [B, ndims, *S]``.
        image: the original image ``[B, 1, *S]`` as the network expects it (0..1).
        diffused: the starting field ``u`` at ``t0`` ``[B, ndims, *S]`` voxels.
        first_step: ``[B]`` long, the first step asked of the network for each sample; shorter
            chains wait (keep ``u``) until the longest reaches their first call; all end at 0.
        mode: interpolation used to re-warp the original image for the next network input.
        sampling_steps, skipped_steps, deformation: the few-step chain (:func:`step_plan`);
            the defaults call the network at every step.
        compose_padding: how the accumulated field is read outside the image when a prediction
            is composed onto it (:func:`drdm.deform.compose`): ``"border"`` or ``"zeros"`` (the
            authors' chain).
    """
    if image.shape[0] != diffused.shape[0] or image.shape[2:] != diffused.shape[2:]:
        raise ValueError(
            f"image {tuple(image.shape)} and diffused field {tuple(diffused.shape)} must share "
            "batch size and spatial shape"
        )
    plan = step_plan(first_step, sampling_steps, skipped_steps, deformation)
    displacement = diffused
    current = warp(image, displacement, mode=mode)
    ndims = diffused.shape[1]
    for call in range(plan.calls):
        active = plan.active[call].view(-1, *([1] * (ndims + 1)))
        prediction = net(current, plan.steps[call]).to(displacement.dtype)
        if not plan.single[call]:
            prediction = displacement_power(prediction, plan.power[call])
        composed = compose(displacement, prediction, padding=compose_padding)
        displacement = torch.where(active, composed, displacement)
        if call + 1 < plan.calls:  # the next call's input; the last one needs none
            current = warp(image, displacement, mode=mode)
    return displacement
