"""jocor_ddp: JoCoR learning with noisy labels under torch.distributed."""

__version__ = "0.1.0"
