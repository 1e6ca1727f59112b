"""maskkit: masking strategies for masked-autoencoder pretraining (MLO-MAE at its heart)."""

__version__ = "0.1.0"
