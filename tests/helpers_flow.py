"""Small randomised flows shared by the model and sampler tests."""

import torch

from simflow.flow import TransformerFlow


def randomise(model: TransformerFlow, std: float = 0.1) -> TransformerFlow:
    """Give the zero-initialised parts (output projections, AdaLN) random values, so a test of
    invertibility or causality is not trivially passed by identity blocks."""
    torch.manual_seed(1234)
    for name, param in model.named_parameters():
        if name.endswith("weight") and param.dim() > 1:
            torch.nn.init.normal_(param, std=std)
        elif name.endswith("bias"):
            torch.nn.init.normal_(param, std=std)
    return model.eval()


CONFIGS = {
    "multi_block": dict(in_channels=4, img_size=8, patch_size=1, channels=32, layers_per_block=[1, 1, 1]),
    "patch2": dict(in_channels=3, img_size=8, patch_size=2, channels=32, layers_per_block=[2, 1]),
    "conditional_adaln": dict(in_channels=4, img_size=4, patch_size=1, channels=32, layers_per_block=[1, 2],
                              num_classes=5),
    "conditional_add_exp": dict(in_channels=2, img_size=4, patch_size=1, channels=32, layers_per_block=[2, 2],
                                num_classes=3, conditioning="add", scale_param="exp", soft_clip=0.0),
    "deep_shallow": dict(in_channels=4, img_size=4, patch_size=1, channels=32, layers_per_block=[1, 1, 1, 4]),
}


def make(name: str) -> TransformerFlow:
    torch.manual_seed(0)
    return randomise(TransformerFlow(head_dim=16, **CONFIGS[name]))


def labels_for(model: TransformerFlow, batch: int) -> torch.Tensor | None:
    if model.num_classes == 0:
        return None
    return torch.arange(batch) % model.num_classes
