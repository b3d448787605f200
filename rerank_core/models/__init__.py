"""One module per architecture: the text cross-encoder and the multimodal (VL) cross-encoder."""
