"""The three click jobs: prepare-data, pretrain-simclr, train-classifier (thin wrappers over ``common``)."""
