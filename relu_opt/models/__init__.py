"""Built-in architectures, registered by name."""

from relu_opt.models import mobilenet, resnet_cifar, small_cnn, vgg, vit, wide_resnet  # noqa: F401  (registers)
from relu_opt.models.registry import (
    ModelEntry,
    create_model,
    get_entry,
    list_models,
    register_model,
)

__all__ = [
    "ModelEntry",
    "create_model",
    "get_entry",
    "list_models",
    "register_model",
]
