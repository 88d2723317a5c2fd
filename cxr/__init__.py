"""cxr: fine-tune and sweep a ResNet50 chest X-ray classifier with Hydra, PyTorch and TensorBoard."""
