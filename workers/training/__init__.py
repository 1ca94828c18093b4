"""DreamBooth fine-tuning of DiffuseKronA factors (SD 1.x/2.x and SDXL), with exact resume.

The parts (`load_components`, `prepare_data`, `build_adapter`, `train_step`, `save_checkpoint`,
`save_trained_adapter`) are callable on their own; `train` runs them with progress, cancellation,
checkpoints and validation images. `check_factors_fit_base_model` validates a job against the base
model's UNet config (no weights) before anything heavy starts.
"""

from shared.images import ImageLimits, SubjectImage, decode_image, list_image_files, load_subject_images
from shared.training_spec import TrainingSpec

from .components import Components, encode_prompt, load_components, native_resolution
from .data import to_training_tensor
from .trainer import (
    PreparedData,
    Progress,
    TrainingCanceled,
    TrainingResult,
    TrainState,
    build_adapter,
    denoising_loss,
    find_latest_checkpoint,
    generate_class_images,
    load_checkpoint,
    prepare_data,
    render_validation_images,
    save_checkpoint,
    save_trained_adapter,
    train,
    train_step,
)
from .validation import check_factors_fit_base_model

__all__ = [
    "Components",
    "ImageLimits",
    "PreparedData",
    "Progress",
    "SubjectImage",
    "TrainState",
    "TrainingCanceled",
    "TrainingResult",
    "TrainingSpec",
    "build_adapter",
    "check_factors_fit_base_model",
    "decode_image",
    "denoising_loss",
    "encode_prompt",
    "find_latest_checkpoint",
    "generate_class_images",
    "list_image_files",
    "load_checkpoint",
    "load_components",
    "load_subject_images",
    "native_resolution",
    "prepare_data",
    "render_validation_images",
    "save_checkpoint",
    "save_trained_adapter",
    "to_training_tensor",
    "train",
    "train_step",
]
