"""Hydra overrides the tests share: tiny, fast runs of the real configs."""

# a registration run on the embedded default (32 x 32, small U-Net, one training batch)
TINY_REGISTRATION = [
    "experiment=default_registration",
    "torch_threads=1",
    "logger=csv",
    "callbacks=none",
    "test=false",
    "data.image_size=[32,32]",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "data.pairs.max_pairs_eval=2",
    "model.ncc_window=5",
    "model.net.encoder_channels=[4,8]",
    "model.net.decoder_channels=[8,8]",
    "model.net.final_channels=[4]",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]

# two DDP processes on the CPU (gloo), as hardware=ddp sets them up on a GPU node
CPU_DDP = [
    "hardware=ddp",
    "hardware.accelerator=cpu",
    "hardware.devices=2",
    "hardware.precision=32-true",
]
