"""Training: settings declared once (`ptanet.train.settings`), the training loop (`ptanet.train.loop`)
and per-configuration BatchNorm recalibration (`ptanet.train.batchnorm`). The library core (models,
configurations, checkpoints, preprocessing, runtime) never imports this package."""
