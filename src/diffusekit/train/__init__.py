"""Training: the loop (``trainer``), what a checkpoint of it holds (``state``), the EMA (``ema``) and
DistributedDataParallel under torchrun (``distributed``)."""
