"""`python -m ann2snn`: the same command as `ann2snn` (also under torchrun)."""
from .cli import main

main()
