"""The train stage: FSDP2 training of the student under torchrun (see launch.train)."""
