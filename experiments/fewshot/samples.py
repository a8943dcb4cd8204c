"""Figure of the synthetic image+label pairs a DRDM strategy adds to few-shot training batches.

Builds the strategy from ``conf/augmentation/<name>.yaml`` exactly as training does, applies its
batch transform to a few labelled training slices of the embedded default data and draws, per
slice: the real image and label, then the synthetic image and label (one field warps both) for
two draws of ``t0``.

Usage::

    python experiments/fewshot/samples.py [--drdm-ckpt PATH] [--strategy drdm_cpu]
        [--output experiments/fewshot/results/drdm_samples.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from drdm.utils.atomic import save_figure_atomic

HERE = Path(__file__).resolve().parent
CONF_DIR = HERE.parents[1] / "conf"


def labelled_slices(count: int, seed: int) -> dict:
    """``count`` labelled training slices of the embedded data as one batch."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        config = compose("train", overrides=["experiment=default_fewshot", f"seed={seed}"])
    datamodule = instantiate(config.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    keep = batch["has_label"].bool().nonzero().flatten()[:count]
    return {
        key: value[keep] if isinstance(value, torch.Tensor) else [value[i] for i in keep.tolist()]
        for key, value in batch.items()
    }


def strategy_transform(name: str, checkpoint: Path):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        config = compose(
            "train",
            overrides=[
                "experiment=default_fewshot",
                f"augmentation={name}",
                f"drdm_checkpoint={checkpoint}",
            ],
        )
    strategy = instantiate(config.augmentation)
    if not strategy.batch_transforms:
        raise ValueError(f"augmentation={name} has no batch transform (no synthetic pairs)")
    return strategy


def one_sample(batch: dict, index: int) -> dict:
    return {
        key: value[index : index + 1] if isinstance(value, torch.Tensor) else [value[index]]
        for key, value in batch.items()
    }


def draw(batch: dict, outputs: list[list[dict]], path: Path) -> None:
    """Rows: slices; columns: real image / label, then each synthetic image / label of the row.

    ``outputs[row]`` are transformed one-sample batches of that row (real sample first, its
    synthetic pair last).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = batch["image"].shape[0]
    columns = 2 + 2 * len(outputs[0])
    figure, axes = plt.subplots(count, columns, figsize=(1.6 * columns, 1.7 * count))
    for row in range(count):
        panels = [("real image", batch["image"][row]), ("real label", batch["label"][row])]
        for draw_index, out in enumerate(outputs[row], 1):
            panels += [
                (f"synthetic {draw_index}", out["image"][-1]),
                (f"its label {draw_index}", out["label"][-1]),
            ]
        for column, (title, tensor) in enumerate(panels):
            axis = axes[row, column]
            is_label = "label" in title
            axis.imshow(
                tensor[0].float().numpy(),
                cmap="viridis" if is_label else "gray",
                vmin=0 if is_label else None,
                vmax=3 if is_label else None,
                interpolation="nearest",
            )
            axis.set_title(title if row == 0 else "", fontsize=8)
            axis.set_xticks([])
            axis.set_yticks([])
    figure.tight_layout()
    try:
        save_figure_atomic(figure, path, dpi=80)
    finally:
        plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drdm-ckpt", default="default", help="default: the packaged DRDM")
    parser.add_argument("--strategy", default="drdm_cpu")
    parser.add_argument("--count", type=int, default=3, help="slices shown")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "drdm_samples.png")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    batch = labelled_slices(args.count, args.seed)
    strategy = strategy_transform(args.strategy, args.drdm_ckpt)
    # one synthetic pair per real slice, twice; each draw is a fresh generator call
    for transform in strategy.batch_transforms:
        transform.ratio = 1.0
        transform.source.fields_per_image = 0
    outputs = [
        [strategy.device(one_sample(batch, row)) for _ in range(2)]
        for row in range(batch["image"].shape[0])
    ]
    draw(batch, outputs, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
