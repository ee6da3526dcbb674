"""DataModules that feed activations to the SAE, registered under ``sae_lightning.datamodules``."""
