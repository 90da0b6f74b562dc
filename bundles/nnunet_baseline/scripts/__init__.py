"""Code of the nnunet_baseline bundle: nnU-Net v2 dataset conversion, training and prediction (to come)."""
