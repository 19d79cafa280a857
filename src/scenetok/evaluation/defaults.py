"""Default model ids of the metrics (the papers' models). Tests and offline users pass local folders."""

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # Break-A-Scene prompt similarity: CLIP ViT-L/14
DEFAULT_DINO = "facebook/dino-vitb16"  # Break-A-Scene identity: DINO ViT-B/16
DEFAULT_MASKFORMER = "facebook/maskformer-swin-large-coco"  # COCO panoptic MaskFormer, Swin-L
