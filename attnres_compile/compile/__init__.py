"""The `attnres` torch.compile backend (backend.py) and its graph passes (passes/)."""
