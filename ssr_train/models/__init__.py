"""The segmentor: timm backbones, DAFormer head, SSR regulariser, and the SAM-free shadow branch."""
