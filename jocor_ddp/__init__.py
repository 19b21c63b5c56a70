"""jocor_ddp: JoCoR learning with noisy labels under torch.distributed."""

import os as _os

__version__ = "0.1.0"

# The parent this process started under, read before the seconds of importing torch: a torchrun
# worker whose launcher dies during them finds another parent by the time it can ask the kernel
# to end it with the launcher (dist.die_with_launcher), and this tells it so.
PARENT_AT_START = _os.getppid()
