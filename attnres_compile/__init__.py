"""attnres-compile: retrofit Block Attention Residuals into traced PyTorch models."""
