"""Generation (method §5): diffuse part-way, recover fully, keep image, label and field.

>>> drdm = DRDM.load("logs/drdm/runs/<time>/checkpoints/last.ckpt")   # or the authors' .pth
>>> out = drdm.generate(image, label, num_samples=8, seed=0)
>>> out.image, out.label, out.displacement, out.t0

For every sample: a fresh random field ``u`` diffuses the image to ``t0``; the network then
recovers step by step (``u <- compose(u, p_i)``, see :mod:`drdm.generation.chain`), always
re-warping the **original**. The sample is ``warp(original, u)``; ``u`` is returned in voxels of
the input grid, so ``warp(original, out.displacement) == out.image``.

Inputs of another size than the model's are resized to the model size for the network only; the
final field is resampled to the input grid (its voxel units rescaled) and the original is warped
at full resolution, so outputs keep the input's geometry. A 2D model applied to a 3D volume works
slice by slice along ``slice_axis`` (the field's through-plane component is zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from drdm.checkpoints import load_reference_checkpoint, rebuild_drdm, resolve_checkpoint
from drdm.deform import RandomDeformation, folding_ratio
from drdm.deform.smoothing import check_repair_options, repair_folding
from drdm.deform.spatial import warp
from drdm.generation.chain import check_sampling_steps, minmax_normalise, recover, start_steps
from drdm.generation.slices import field_to_volume, to_slices, to_volume
from drdm.utils.seeds import mix_seed

PRECISIONS = ("fp32", "bf16")
# The shipped generation default: what every route (``DRDM.load`` from Python, src/augment.py,
# the DRDM augmentation and the registration's DRDM field source, all through ``DRDM.load``) uses
# where neither its caller nor the checkpoint sets a value. A few-step chain: 20 network calls
# from T-1, each prediction applied once, no margin, folds smoothed away after the chain. Against
# the authors' own code (experiments/benchmarks/results/fidelity.md) it is the fewest calls
# measured whose samples deform as much as theirs (mean displacement 1.03x; 16 calls: 1.12x,
# 7 calls: 1.78x), at 5x their speed on a CPU; it does not pass that benchmark's distribution test.
SHIPPED_DEFAULTS = {
    "start_step": "T",
    "sampling_steps": 20,
    "skipped_steps": "once",
    "margin": 0,
    "fold_repair": True,
}


def deformation_config(name: str) -> dict:
    """``conf/deformation/<name>.yaml`` (with its base) as ``RandomDeformation`` arguments.

    Read from the package (``drdm/deformation_configs``, a link to ``conf/deformation`` in the
    checkout, copied into the wheel), so an installed drdm needs no checkout."""
    # OmegaConf resolves the config's defaults list: imported here so that drdm.generation.chain
    # imports without it (tests/test_layers.py)
    from drdm.utils.instantiate import load_config

    folder = Path(__file__).resolve().parents[1] / "deformation_configs"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml") if p.stem != "base")
        raise FileNotFoundError(
            f"no forward-process config {name!r} in this drdm install ({path}); known: {known}"
        )
    config = dict(load_config(path))
    config.pop("_target_", None)
    return config


def t0_schedule(num_samples: int, start: int, step: int = 2, every: int = 2) -> list[int]:
    """``t0`` of sample ``k``: ``start + step * (k // every)`` (reference: 48, +2 every 2 in 2D).

    The reference's loop raises ``t0`` after every even sample (48, 50, 50, 52, ...); ours raises
    it after every ``every`` samples (48, 48, 50, 50, ...), the schedule its docs describe.
    """
    if every < 1:
        raise ValueError(f"t0 schedule 'every' must be >= 1, got {every}")
    return [int(start + step * (k // every)) for k in range(num_samples)]


@dataclass
class Generated:
    """Generated samples, ``N = num_inputs * num_samples`` (input-major order).

    image ``[N, 1, *S]`` (input dtype float), label ``[N, 1, *S]`` int64 or ``None``,
    displacement ``[N, ndims_in, *S]`` voxels of the input grid (``warp(input, displacement)`` is
    the sample), t0 ``[N]`` long, folding_ratio ``[N]`` (fraction of ``det J <= 0``; slice mode:
    mean over slices), repaired_ratio ``[N]`` (fraction of the field's voxels the fold repair
    changed, 0 without it; slice mode: mean over slices), input_index / sample_index ``[N]`` long.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    displacement: torch.Tensor
    t0: torch.Tensor
    folding_ratio: torch.Tensor
    repaired_ratio: torch.Tensor
    input_index: torch.Tensor
    sample_index: torch.Tensor


def resize_field(displacement: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample a voxel field ``[B, n, *M]`` onto ``shape`` and rescale its voxel units.

    Corner voxels stay aligned (``align_corners=True`` everywhere in drdm), so one voxel of ``M``
    along axis ``i`` is ``(S_i - 1) / (M_i - 1)`` voxels of ``S``.
    """
    source = tuple(displacement.shape[2:])
    shape = tuple(int(n) for n in shape)
    if source == shape:
        return displacement
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    resized = F.interpolate(displacement, size=shape, mode=mode, align_corners=True)
    scale = torch.tensor(
        [(s - 1) / max(m - 1, 1) for s, m in zip(shape, source)],
        device=displacement.device,
        dtype=displacement.dtype,
    )
    return resized * scale.view(1, len(shape), *([1] * len(shape)))


def resize_image(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``[B, C, *S]`` float image -> ``[B, C, *shape]`` (linear, corners aligned)."""
    shape = tuple(int(n) for n in shape)
    if tuple(image.shape[2:]) == shape:
        return image
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(image, size=shape, mode=mode, align_corners=True)


def resolve_margin(margin: int | float | None, image_size: Sequence[int]) -> int:
    """Margin in voxels: an int as given, a float in ``(0, 1)`` as that fraction of the model
    size (``0.0625``: 16 voxels at 256), ``None``: an eighth of it."""
    if margin is None:
        margin = 0.125
    if isinstance(margin, bool) or not isinstance(margin, int | float) or margin < 0:
        raise ValueError(
            f"margin must be voxels (int >= 0) or a fraction in (0, 1), got {margin!r}"
        )
    if isinstance(margin, float) and not margin.is_integer():
        if margin >= 1:
            raise ValueError(f"a fractional margin must lie in (0, 1), got {margin}")
        return int(round(margin * max(image_size)))
    return int(margin)


def _chain_mode(warp_mode: str | None) -> str | None:
    """The chain's re-warp mode for a model trained with ``warp_mode`` (None: the default)."""
    return warp_mode if warp_mode in ("bilinear", "bicubic") else None


def _set_options(options: dict) -> dict:
    """The options a caller actually set (``None`` means "the default")."""
    return {key: value for key, value in options.items() if value is not None}


def generation_settings(
    caller: dict | None = None, checkpoint: dict | None = None, fallback: dict | None = None
) -> dict:
    """The one precedence of generation settings, on every route: what the ``caller`` set, over
    what the ``checkpoint`` says (a ``.ckpt``'s recommendation, the authors' numerics for their
    ``.pth``), over ``fallback`` (``None``: :data:`SHIPPED_DEFAULTS`), over the :class:`DRDM`
    defaults. ``None`` values mean "not set" at every level."""
    fallback = SHIPPED_DEFAULTS if fallback is None else fallback
    return {
        **_set_options(fallback),
        **_set_options(checkpoint or {}),
        **_set_options(caller or {}),
    }


class DRDM:
    """A trained recovery network with its forward process, ready to generate samples.

    Args:
        net: ``net(image [B,1,*M], t [B]) -> [B, ndims, *M]`` voxels.
        deformation: ``RandomDeformation`` of the model (``deformation(M, t, generator)``).
        image_size: ``M``, the model's input size.
        interpolation: image resampling of the outputs (``bicubic`` 2D only, ``bilinear``).
        t0_start, t0_step, t0_every: default ``t0`` schedule (see :func:`t0_schedule`);
            ``None``: ``round(0.6 T)``, +2 (2D) / +1 (3D) every 2 samples as in the reference.
        start_step: where the recovery chain starts: ``"T"`` (``T-1``, the reference), ``"t0"``
            (``t0-1``) or an int.
        sampling_steps: network calls per sample, spread over the chain (a few-step chain,
            :func:`drdm.generation.chain.step_plan`), or ``"all"``: one call per step (the
            method). ``"all"`` is the one spelling of the full chain; ``None`` is refused here
            (in options, ``None`` means "not set": see :meth:`load`).
        skipped_steps: how a call's prediction stands in for the steps it skips: ``"once"``
            (applied once: the chain visits fewer steps), ``"repeat"`` (applied once per step,
            exact self-composition), ``"k_rec"`` (rescaled to the recovery the network is
            trained to give over them), ``"remaining"`` (to the share of the deformation left
            that they remove) or ``"uncorrelated"`` (to their size added in quadrature);
            :mod:`drdm.generation.chain`.
        precision: the network's arithmetic: ``"fp32"`` or ``"bf16"`` (autocast around each
            network call; fields are composed and warped in fp32). Check a model in
            ``experiments/benchmarks/generation.py`` (``~bf16`` rows) before using bf16: the
            authors' checkpoint is not robust to it (its samples deform far more than in
            fp32, ``experiments/benchmarks/results/generation.md``).
        batch_size: images per network call, or ``"auto"``: as many as fit a pixel budget on
            the recovery canvas (image plus margin): ``2**16`` pixels on a CPU (one image at
            256 x 256, 16 at 64 x 64: on a CPU, batches of large images run past the caches and
            slow each image down; in the speed part of ``experiments/benchmarks/generation.py``
            the shipped default ran at 12.7x the authors' procedure with 2 images per call at
            256 x 256 and 15.3x with 1, medians of 3 repeats) and ``2**23`` on a GPU.
        margin: voxels added around the model-size image (and its field, replicated) during
            recovery, cropped afterwards, so the image border is not an edge of the network's
            input; on the ACDC sample with the authors' checkpoint this takes folding from 2.4 %
            (all at the border) to 0. An int: voxels; a float in ``(0, 1)``: that fraction of
            the model size; ``None``: an eighth of it (:func:`resolve_margin`).
        margin_padding: how the image is extended into the margin: ``reflect`` (default; zeros,
            ``constant``, show the network a black frame, which it "recovers" by zooming in).
        fold_repair: smooth each final field where it folds until it no longer does
            (:func:`drdm.deform.repair_folding`, on the input grid, before the image and label
            are warped): the border fix at a few blurs of one field instead of a margin's extra
            pixels in every network call. ``Generated.repaired_ratio`` says how much of each
            field it changed.
        fold_repair_sigma, fold_repair_dilation, fold_repair_iterations: its Gaussian (voxels),
            how far around a fold it smooths (voxels) and its iteration limit.
        compose_padding: how the chain reads the accumulated field outside the image when it
            composes a prediction onto it: ``"border"`` or ``"zeros"`` (the authors' chain, their
            2D config's ``padding_mode``). ``None``: ``"zeros"`` for the authors' ``.pth``,
            ``"border"`` for drdm's own models.
        chain_interpolation: how the original is re-warped as each network call's input
            (``bilinear`` or ``bicubic``). ``None``: the interpolation the model was trained with
            (a ``.ckpt``'s ``warp_mode``; ``bicubic`` for the authors' ``.pth``, as their
            ``resample_mode``), else ``bilinear``.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        deformation: torch.nn.Module,
        image_size: Sequence[int],
        interpolation: str | None = None,
        t0_start: int | None = None,
        t0_step: int | None = None,
        t0_every: int = 2,
        start_step: str | int = "T",
        sampling_steps: int | str = "all",
        skipped_steps: str = "once",
        batch_size: int | str = 32,
        margin: int | float | None = None,
        margin_padding: str = "reflect",
        precision: str = "fp32",
        fold_repair: bool = False,
        fold_repair_sigma: float = 4.0,
        fold_repair_dilation: int = 4,
        fold_repair_iterations: int = 50,
        compose_padding: str | None = None,
        chain_interpolation: str | None = None,
    ) -> None:
        self.memory_format = torch.channels_last if len(image_size) == 2 else torch.channels_last_3d
        # channels-last convolutions: about 14 % less time per network call on a CPU (the
        # authors' RecResACNet, batch 2 at 320^2, one thread), and the layout cuDNN prefers
        self.net = net.eval().to(memory_format=self.memory_format)
        self.deformation = deformation
        self.image_size = tuple(int(n) for n in image_size)
        self.ndims = len(self.image_size)
        if self.ndims not in (2, 3):
            raise ValueError(f"image_size must have 2 or 3 entries, got {self.image_size}")
        self.timesteps = int(getattr(net, "timesteps", None) or deformation.timesteps)
        self.interpolation = interpolation or ("bicubic" if self.ndims == 2 else "bilinear")
        if self.interpolation == "bicubic" and self.ndims == 3:
            raise ValueError("bicubic interpolation is 2D only; use bilinear for a 3D model")
        self.t0_start = round(0.6 * self.timesteps) if t0_start is None else int(t0_start)
        self.t0_step = (2 if self.ndims == 2 else 1) if t0_step is None else int(t0_step)
        self.t0_every = int(t0_every)
        self.start_step = start_step
        if sampling_steps is None:
            raise ValueError(
                'sampling_steps=None: say "all" for one network call per step (in DRDM.load '
                "options and configs, null means not set: the checkpoint's or the shipped value)"
            )
        sampling_steps = None if sampling_steps == "all" else sampling_steps
        check_sampling_steps(sampling_steps, skipped_steps)
        self.sampling_steps = sampling_steps
        self.skipped_steps = skipped_steps
        if batch_size != "auto" and (isinstance(batch_size, str) or int(batch_size) < 1):
            raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
        self.batch_size = batch_size if batch_size == "auto" else int(batch_size)
        self.margin = resolve_margin(margin, self.image_size)
        if margin_padding not in ("reflect", "replicate", "constant"):
            raise ValueError(
                f"margin_padding must be reflect | replicate | constant, got {margin_padding!r}"
            )
        self.margin_padding = margin_padding
        if precision not in PRECISIONS:
            raise ValueError(
                f"precision must be one of {' | '.join(PRECISIONS)}, got {precision!r}"
            )
        self.precision = precision
        if not isinstance(fold_repair, bool):
            raise ValueError(f"fold_repair must be true or false, got {fold_repair!r}")
        check_repair_options(fold_repair_sigma, fold_repair_dilation, fold_repair_iterations)
        self.fold_repair = fold_repair
        self.fold_repair_sigma = float(fold_repair_sigma)
        self.fold_repair_dilation = int(fold_repair_dilation)
        self.fold_repair_iterations = int(fold_repair_iterations)
        self.compose_padding = compose_padding or "border"
        if self.compose_padding not in ("border", "zeros"):
            raise ValueError(f"compose_padding must be border | zeros, got {compose_padding!r}")
        self.chain_interpolation = chain_interpolation or "bilinear"
        if self.chain_interpolation not in ("bilinear", "bicubic") or (
            self.chain_interpolation == "bicubic" and self.ndims == 3
        ):
            raise ValueError(
                "chain_interpolation must be bilinear (or bicubic in 2D), "
                f"got {chain_interpolation!r}"
            )
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        path: str | Path,
        map_location: str = "cpu",
        use_ema: bool = True,
        deformation: dict | None = None,
        fallback: dict | None = None,
        **options,
    ):
        """Load a Lightning ``.ckpt`` (DRDMModule) or the authors' ``.pth`` (2D, 256 x 256);
        ``"default"`` is the packaged model for the embedded data (:mod:`drdm.pretrained`).

        ``deformation``: ``RandomDeformation`` arguments overriding the forward process of a
        ``.pth`` (a ``.ckpt`` keeps the forward process it was trained with). ``options`` are
        :class:`DRDM` arguments (``interpolation``, ``t0_start``, ...). Each setting comes from,
        first to last (:func:`generation_settings`):
        ``options`` (``None``: unset), what the checkpoint says (a ``.ckpt``'s recommended
        ``generation_defaults``, e.g. the packaged model's ``t0_start=24``, ``start_step="t0"``,
        ``sampling_steps="all"``; the authors' chain numerics for their ``.pth``), ``fallback``
        (default :data:`SHIPPED_DEFAULTS`, the few-step default every route shares; ``{}``: none),
        the :class:`DRDM` defaults.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: a ``.ckpt`` without DRDMModule hyper-parameters, or an unknown suffix.
        """
        path = resolve_checkpoint(path)
        if not path.is_file():
            raise FileNotFoundError(f"DRDM checkpoint not found: {path}")
        if path.suffix == ".ckpt":
            net, deformation, hparams, recommended = rebuild_drdm(path, map_location, use_ema)
            trained = {"chain_interpolation": _chain_mode(hparams.get("warp_mode"))}
            checkpoint = {**_set_options(trained), **recommended}
            settings = generation_settings(options, checkpoint, fallback)
            return cls(net, deformation, hparams["image_size"], **settings)
        if path.suffix in (".pth", ".pt"):
            net = load_reference_checkpoint(path, map_location=map_location)
            # The authors' schedule at their 256 x 256 training size, on drdm's integrator with the
            # scale calibrated to theirs (conf/deformation/reference_2d.yaml): the same magnitudes
            # without the folding of their forward fields. deformation={"integrator": "reference",
            # "v_scale": 4e-5, "refinement": 1} reproduces their numerics exactly.
            settings = {**deformation_config("reference_2d"), **(deformation or {})}
            settings.update(ndims=net.ndims, timesteps=net.timesteps)
            deformation = RandomDeformation(**settings)
            # the authors' chain numerics (their config: padding_mode zeros, resample_mode bicubic)
            authors = {"compose_padding": "zeros", "chain_interpolation": "bicubic"}
            settings = generation_settings(options, authors, fallback)
            return cls(net, deformation, (256,) * net.ndims, **settings)
        raise ValueError(f"{path}: expected a Lightning .ckpt or the authors' .pth state_dict")

    def to(self, device: str | torch.device) -> DRDM:
        """Move the network (and future fields) to ``device``; returns ``self``."""
        self.device = torch.device(device)
        self.net.to(self.device)
        self.deformation.to(self.device)
        return self

    def settings(self) -> dict:
        """Every setting that shapes a sample (plain values): what a resumed run must share."""
        names = (
            "image_size", "interpolation", "t0_start", "t0_step", "t0_every", "start_step",
            "sampling_steps", "skipped_steps", "batch_size", "margin", "margin_padding",
            "precision", "fold_repair", "fold_repair_sigma", "fold_repair_dilation",
            "fold_repair_iterations", "compose_padding", "chain_interpolation",
        )  # fmt: skip
        values = {name: getattr(self, name) for name in names}
        values["image_size"] = list(self.image_size)
        values["sampling_steps"] = self.sampling_steps or "all"
        values["timesteps"] = self.timesteps
        return values

    @property
    def images_per_call(self) -> int:
        """Images per network call (``batch_size``, resolved for ``"auto"``)."""
        if self.batch_size != "auto":
            return self.batch_size
        budget = 2**23 if self.device.type == "cuda" else 2**16
        canvas = math.prod(n + 2 * self.margin for n in self.image_size)
        return max(1, budget // canvas)

    @property
    def network_dtype(self) -> torch.dtype:
        """The dtype of the network's arithmetic (``precision``)."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _network(self):
        """``net(image, t)``, under bf16 autocast where :attr:`network_dtype` says so."""
        if self.network_dtype == torch.float32:
            return self.net
        device_type, net = self.device.type, self.net

        def network(image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return net(image, t)

        return network

    def t0_for(self, num_samples: int) -> list[int]:
        """The default ``t0`` of samples ``0 .. num_samples-1``, clamped to ``T - 1``."""
        values = t0_schedule(num_samples, self.t0_start, self.t0_step, self.t0_every)
        return [min(t, self.timesteps - 1) for t in values]

    # ------------------------------------------------------------------ generation
    def _t0_list(self, t0, sample_indices: Sequence[int]) -> list[int]:
        if t0 is None:
            schedule = self.t0_for(max(sample_indices) + 1)
            return [schedule[k] for k in sample_indices]
        if isinstance(t0, int | float) or (isinstance(t0, torch.Tensor) and t0.ndim == 0):
            values = [int(t0)] * len(sample_indices)
        else:
            values = [int(t) for t in t0]
            if len(values) != len(sample_indices):
                raise ValueError(
                    f"t0 has {len(values)} values for {len(sample_indices)} samples per input"
                )
        for t in values:
            if not 0 <= t < self.timesteps:
                raise ValueError(f"t0 must lie in 0 .. {self.timesteps - 1}, got {t}")
        return values

    def _layout(self, image: torch.Tensor, slice_axis: int) -> tuple[torch.Tensor, bool]:
        """Input -> ``[B, 1, *S]`` (``B`` images or slices) and whether it is slice mode."""
        if image.ndim == self.ndims:
            return image[None, None], False
        if image.ndim == self.ndims + 2 and image.shape[1] == 1:
            return image, False
        if self.ndims == 2 and image.ndim == 3:
            return to_slices(image, slice_axis), True
        raise ValueError(
            f"image must be [*S] ({self.ndims} dims), [B, 1, *S], or a 3D volume for a 2D model; "
            f"got shape {tuple(image.shape)}"
        )

    @torch.no_grad()
    def generate(
        self,
        image,
        label=None,
        num_samples: int = 1,
        t0=None,
        seed: int = 0,
        sample_indices: Sequence[int] | None = None,
        slice_axis: int = -1,
    ) -> Generated:
        """Generate ``num_samples`` deformed instances of each input image.

        Args:
            image: ``[*S]`` (one image), ``[B, 1, *S]`` (a batch), or for a 2D model a 3D volume
                ``[X, Y, Z]`` processed slice by slice along ``slice_axis``. Tensor or array.
            label: same layout as ``image`` (integer), warped with nearest neighbour; optional.
            num_samples: samples per input (``k = 0 .. num_samples-1``).
            t0: diffusion step: an int for all, one per sample, or ``None`` for the schedule.
            seed: sample ``k`` of input ``b`` draws its field from ``mix_seed(seed, b, k)``, so a
                sample does not depend on which others are generated with it.
            sample_indices: generate only these ``k`` (resuming); default ``range(num_samples)``.
            slice_axis: the through-plane axis of a volume given to a 2D model.

        Returns:
            :class:`Generated`; in slice mode ``[N, 1, X, Y, Z]`` volumes with 3-component fields.
        """
        image = torch.as_tensor(image)
        indices = list(range(num_samples)) if sample_indices is None else list(sample_indices)
        if not indices:
            raise ValueError("nothing to generate: num_samples / sample_indices is empty")
        t0_values = self._t0_list(t0, indices)
        batch, slice_mode = self._layout(image, slice_axis)
        label_batch = None
        if label is not None:
            label = torch.as_tensor(label)
            if label.shape != image.shape:
                raise ValueError(
                    f"label {tuple(label.shape)} must have the image's shape {tuple(image.shape)}"
                )
            label_batch = self._layout(label, slice_axis)[0].long()
        batch = batch.to(self.device, torch.float32)
        inputs = 1 if slice_mode else batch.shape[0]
        per_input = batch.shape[0] // inputs  # slices per sample (1 unless slice mode)

        # one generator per (input, k): fields independent of the batching
        model_images = minmax_normalise(resize_image(batch, self.image_size))
        diffused, t0_rows, first_rows, order = [], [], [], []
        for b in range(inputs):
            for k, t0_k in zip(indices, t0_values):
                generator = torch.Generator(device=self.device).manual_seed(mix_seed(seed, b, k))
                t = torch.full((per_input,), t0_k, device=self.device, dtype=torch.long)
                diffused.append(self.deformation.diffused(self.image_size, t, generator=generator))
                t0_rows.append(t)
                first_rows.append(start_steps(t, self.timesteps, self.start_step))
                order.append((b, k, t0_k))
        diffused = torch.cat(diffused)
        first = torch.cat(first_rows)
        sources = (
            model_images.repeat(len(indices), *([1] * (batch.ndim - 1)))
            if slice_mode
            else model_images.repeat_interleave(len(indices), dim=0)
        )
        fields = []
        per_call = self.images_per_call
        for start in range(0, diffused.shape[0], per_call):
            chunk = slice(start, start + per_call)
            fields.append(self._recover_with_margin(sources[chunk], diffused[chunk], first[chunk]))
        return self._assemble(
            batch, label_batch, torch.cat(fields), order, per_input, slice_mode, slice_axis
        )

    def _recover_with_margin(self, images, diffused, first):
        """:func:`recover` on a canvas padded by ``margin`` voxels, cropped back to ``M``.

        The network never sees the image border as an edge of its input: the image is extended
        (``margin_padding``) and the field replicated, so the recovered field stays smooth up to the
        image's edges instead of folding there.
        """
        if self.margin == 0:
            canvas, field = images, diffused
        else:
            pad = [self.margin] * (2 * self.ndims)
            canvas = F.pad(images, pad, mode=self.margin_padding)
            field = F.pad(diffused, pad, mode="replicate")
        canvas = canvas.contiguous(memory_format=self.memory_format)
        recovered = recover(
            self._network(),
            canvas,
            field,
            first,
            mode=self.chain_interpolation,
            sampling_steps=self.sampling_steps,
            skipped_steps=self.skipped_steps,
            deformation=self.deformation,
            compose_padding=self.compose_padding,
        )
        if self.margin == 0:
            return recovered
        crop = tuple(slice(self.margin, self.margin + n) for n in self.image_size)
        return recovered[(slice(None), slice(None), *crop)]

    def _assemble(self, batch, label_batch, fields, order, per_input, slice_mode, slice_axis):
        """Native-grid fields, warped images / labels and statistics for every sample."""
        native = tuple(batch.shape[2:])
        images, labels, displacements, foldings, repaired = [], [], [], [], []
        for row, (b, _, _) in enumerate(order):
            rows = slice(row * per_input, (row + 1) * per_input)
            field = resize_field(fields[rows], native)
            changed = torch.zeros(field.shape[0], device=field.device)
            if self.fold_repair:
                field, changed = repair_folding(
                    field,
                    self.fold_repair_sigma,
                    self.fold_repair_dilation,
                    self.fold_repair_iterations,
                )
            repaired.append(changed.mean())
            source = batch if slice_mode else batch[b : b + 1]
            warped = warp(source, field, mode=self.interpolation)
            foldings.append(folding_ratio(field).mean())
            warped_label = None
            if label_batch is not None:
                source_label = label_batch if slice_mode else label_batch[b : b + 1]
                warped_label = warp(source_label, field, mode="nearest")
            if slice_mode:
                field = field_to_volume(field, slice_axis)
                warped = to_volume(warped, slice_axis)
                if warped_label is not None:
                    warped_label = to_volume(warped_label, slice_axis)
            images.append(warped)
            displacements.append(field)
            if warped_label is not None:
                labels.append(warped_label)
        device = fields.device
        return Generated(
            image=torch.cat(images),
            label=torch.cat(labels) if labels else None,
            displacement=torch.cat(displacements),
            t0=torch.tensor([t for _, _, t in order], device=device),
            folding_ratio=torch.stack(foldings),
            repaired_ratio=torch.stack(repaired),
            input_index=torch.tensor([b for b, _, _ in order], device=device),
            sample_index=torch.tensor([k for _, k, _ in order], device=device),
        )
