"""Third-party callables registered with gin, once, here."""

import gin
import torch
import torchvision

for optimizer in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
    gin.external_configurable(optimizer, module="torch.optim")

for arch in (torchvision.models.resnet18, torchvision.models.resnet34,
             torchvision.models.resnet50, torchvision.models.efficientnet_b0,
             torchvision.models.swin_t, torchvision.models.vit_b_16):
    gin.external_configurable(arch, module="torchvision.models")
