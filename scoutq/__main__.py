"""`python -m scoutq ...`: the scoutq command, as torchrun starts it (`torchrun ... -m scoutq quantize ...`)."""

from scoutq.cli.app import main

main()
